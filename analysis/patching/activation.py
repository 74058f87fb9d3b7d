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
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


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


@dataclass
class _Runs:
    """The clean and corrupt runs every patch starts from."""

    clean_cache: dict[str, torch.Tensor]  # node hooks -> [batch, *act]
    corrupt_cache: dict[str, torch.Tensor]  # node hooks and every resid_pre -> [batch, *act]
    corrupt_logits: torch.Tensor  # [batch, pos, vocab]
    clean_metric: torch.Tensor  # [batch] float64
    corrupt_metric: torch.Tensor  # [batch] float64


def _clean_and_corrupt_runs(bridge, clean: torch.Tensor, corrupt: torch.Tensor, metric_fn: MetricFn,
                            names: list[str], resid_names: list[str]) -> _Runs:
    """Both runs with their caches at `names` (and, for the corrupt run, at `resid_names`) and metrics."""
    n_prompts = clean.shape[0]
    clean_logits, clean_cache = run_and_cache(bridge, clean, names)
    clean_metric = evaluate_metric(metric_fn, clean_logits, n_prompts).to(torch.float64)
    del clean_logits
    corrupt_logits, corrupt_cache = run_and_cache(bridge, corrupt, list(dict.fromkeys(resid_names + names)))
    corrupt_metric = evaluate_metric(metric_fn, corrupt_logits, n_prompts).to(torch.float64)
    return _Runs(clean_cache, corrupt_cache, corrupt_logits, clean_metric, corrupt_metric)


@dataclass(frozen=True)
class _Shortcuts:
    """The shortcuts this call takes (module docstring); each None / False is one not taken."""

    skip_layers: bool  # later layers only
    kv: _KVRecorder | None  # later positions only: the corrupt run's keys and values
    reads: _Reads | None  # read logits only: the positions (and vocabulary) the metric reads
    unembed: _SubUnembed | None  # the unembedding restricted to the read vocabulary
    mlp_hooks: frozenset[str] | None  # node hooks inside the last block's MLP, when it runs at read positions only

    def taken(self) -> list[str]:
        on = {"later_layers": self.skip_layers, "later_positions": self.kv is not None,
              "read_positions": self.reads is not None, "read_vocab": self.unembed is not None,
              "last_mlp_read_only": self.mlp_hooks is not None}
        return [name for name, taken in on.items() if taken]


def _choose_shortcuts(bridge, metric_fn: MetricFn, runs: _Runs, names: list[str], resid_names: list[str],
                      n_prompts: int) -> _Shortcuts:
    """Every shortcut that reproduces the full forward on the corrupt run (`_shortcuts`, `_read_only_tail`).

    resid_names: [layer] resid_pre hooks; names: the node hooks."""
    n_layers = len(resid_names)
    skip_layers, kv = _shortcuts(bridge, runs.corrupt_cache, runs.corrupt_logits, n_layers)
    reads = _metric_reads(metric_fn, runs.corrupt_logits, n_prompts) if skip_layers else None
    reads, unembed, mlp_hooks = _read_only_tail(bridge, reads, runs.corrupt_cache[resid_names[-1]],
                                                runs.corrupt_logits, names)
    return _Shortcuts(skip_layers, kv, reads, unembed, mlp_hooks)


@dataclass
class _Nodes:
    """Every node, type-major, then layer, then flat index in the layer's grid (the result layout)."""

    specs: list[NodeSpec]
    act_shape: dict[str, tuple[int, ...]]  # node type -> one prompt's activation shape
    grids: dict[str, tuple[int, ...]]  # node type -> the grid of its nodes in one layer
    hook_mask_shape: dict[str, tuple[int, ...]]  # hook template -> mask shape covering every type patching it
    table: torch.Tensor  # [n_node, 4]: type index, layer, flat grid index, first position its patch changes
    active: torch.Tensor  # [n_active]: the nodes whose patch changes anything

    def masks(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per hook a chunk [k, 4] of table rows patches: [k, *mask shape] bool, set in copy j at node j's elements."""
        k = chunk.shape[0]
        masks: dict[str, torch.Tensor] = {}
        for ti, layer in torch.unique(chunk[:, :2], dim=0).tolist():
            spec = self.specs[ti]
            name = spec.hook_name(layer)
            rows = ((chunk[:, 0] == ti) & (chunk[:, 1] == layer)).nonzero()[:, 0]
            onehot = torch.zeros(rows.numel(), numel(self.grids[spec.name]), dtype=torch.bool)
            onehot[torch.arange(rows.numel()), chunk[rows, 2]] = True
            shape = self.hook_mask_shape[spec.hook]
            node_mask = onehot.reshape(rows.numel(), *spec.mask_shape(self.act_shape[spec.name]))
            if name not in masks:
                masks[name] = torch.zeros(k, *shape, dtype=torch.bool)
            masks[name][rows] |= node_mask.expand(rows.numel(), *shape)
        return masks


def _node_table(specs: list[NodeSpec], runs: _Runs, n_layers: int) -> _Nodes:
    """Every node of `specs` in every layer, with whether and from which position its patch changes anything."""
    act_shape = {s.name: tuple(runs.clean_cache[s.hook_name(0)].shape[1:]) for s in specs}
    grids = {s.name: s.grid(act_shape[s.name]) for s in specs}
    hook_mask_shape: dict[str, tuple[int, ...]] = {}
    for s in specs:
        shape = s.mask_shape(act_shape[s.name])
        prev = hook_mask_shape.get(s.hook, shape)
        hook_mask_shape[s.hook] = tuple(max(a, b) for a, b in zip(prev, shape))
    table, changed = [], []
    for ti, s in enumerate(specs):
        idx = torch.arange(numel(grids[s.name]))
        for layer in range(n_layers):
            name = s.hook_name(layer)
            node_changed, start = _changed_grid(s, runs.clean_cache[name], runs.corrupt_cache[name])
            table.append(torch.stack([torch.full_like(idx, ti), torch.full_like(idx, layer), idx,
                                      start.flatten().cpu()], 1))
            changed.append(node_changed.flatten().cpu())
    return _Nodes(specs, act_shape, grids, hook_mask_shape, table=torch.cat(table),
                  active=torch.cat(changed).nonzero()[:, 0])


def _run_order(nodes: _Nodes, shortcuts: _Shortcuts, chunk_size: int, n_layers: int, n_pos: int) -> torch.Tensor:
    """The active nodes in the order they are run, chunk_size at a time (`_plan_order`)."""
    layer_pos = nodes.table[nodes.active][:, [1, 3]]  # [n_active, (layer, first changed position)]
    if shortcuts.kv is None:
        layer_pos[:, 1] = 0
    if not shortcuts.skip_layers:
        layer_pos[:, 0] = 0
    return nodes.active[_plan_order(layer_pos, chunk_size, n_layers, n_pos)]


@dataclass
class _Patcher:
    """Runs a chunk of k nodes as one forward pass of k copies of the corrupt batch, node j patched in copy j."""

    bridge: Any
    metric_fn: MetricFn
    corrupt: torch.Tensor  # [batch, pos] tokens
    resid_names: list[str]  # [layer] resid_pre hooks
    runs: _Runs
    nodes: _Nodes
    shortcuts: _Shortcuts
    # Runs from a later position fill in only the entries they unembed, in one copy of the corrupt logits
    # (not one [k * batch, pos, vocab] copy per chunk: 400 MB at GPT-2's vocabulary and chunk 8).
    logits_buf: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = self.shortcuts
        if s.skip_layers and (s.kv is not None or s.reads is not None):
            self.logits_buf = self.runs.corrupt_logits.clone()

    @property
    def n_prompts(self) -> int:
        return self.corrupt.shape[0]

    def run(self, chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(metric [k, batch] of each patched copy, forward passes run) for a chunk [k, 4] of table rows."""
        s = self.shortcuts
        first = int(chunk[:, 1].min()) if s.skip_layers else 0  # blocks before it run as in the corrupt run
        p0 = int(chunk[:, 3].min()) if s.kv is not None else 0  # positions before it: likewise
        if not (s.skip_layers and (p0 > 0 or s.reads is not None)):
            return self._run_every_position(chunk, first), 1
        if s.reads is not None:
            read = s.reads.pos[s.reads.pos >= p0]  # [n_read] positions the metric reads
        else:
            read = torch.arange(p0, self.corrupt.shape[1], device=self.corrupt.device)
        if read.numel() == 0:  # every patch in the chunk starts after the last position read
            return self.runs.corrupt_metric[None].repeat(chunk.shape[0], 1), 0
        return self._run_read_positions(chunk, first, p0, read), 1

    def _run_every_position(self, chunk: torch.Tensor, first: int) -> torch.Tensor:
        """Blocks first.. (or the whole model) on every position: metric [k, batch]."""
        k, runs = chunk.shape[0], self.runs
        device = self.corrupt.device
        hooks = [(name, _patch_hook(m.to(device), runs.clean_cache[name], k))
                 for name, m in self.nodes.masks(chunk).items()]
        if self.shortcuts.skip_layers:
            with self.bridge.hooks(fwd_hooks=hooks):
                logits = _forward_from(self.bridge, first, runs.corrupt_cache[self.resid_names[first]].repeat(k, 1, 1))
        else:
            logits = self.bridge.run_with_hooks(self.corrupt.repeat(k, 1), fwd_hooks=hooks)
        logits = logits.reshape(k, self.n_prompts, *logits.shape[1:])  # [copy, batch, pos, vocab]
        return torch.stack([evaluate_metric(self.metric_fn, logits[j], self.n_prompts) for j in range(k)])

    def _run_read_positions(self, chunk: torch.Tensor, first: int, p0: int, read: torch.Tensor) -> torch.Tensor:
        """Blocks first.. on positions p0.. only (earlier keys/values from the corrupt run), unembedding only the
        entries the metric reads at positions `read`: metric [k, batch]."""
        k, runs, s = chunk.shape[0], self.runs, self.shortcuts
        masks = self.nodes.masks(chunk)
        # every layout starts with pos: a run from p0 sees positions p0.. of masks and activations, and the last
        # block's MLP (when restricted to the read positions) sees those
        at = {name: read if s.mlp_hooks is not None and name in s.mlp_hooks else slice(p0, None) for name in masks}
        hooks = [(name, _patch_hook((m[:, _on(at[name], m)] if m.shape[1] > 1 else m).to(self.corrupt.device),
                                    runs.clean_cache[name][:, at[name]], k)) for name, m in masks.items()]
        resid = runs.corrupt_cache[self.resid_names[first]][:, p0:].repeat(k, 1, 1)  # [k * batch, pos - p0, d_model]
        with self.bridge.hooks(fwd_hooks=hooks):
            patched = _forward_from(self.bridge, first, resid, _PrefixKV(s.kv, p0, k) if p0 > 0 else None, read - p0,
                                    s.unembed, last_mlp_read_only=s.mlp_hooks is not None)
        patched = patched.reshape(k, self.n_prompts, *patched.shape[1:])  # [copy, batch, read, vocab']
        return self._metric_per_copy(patched, read)

    def _metric_per_copy(self, patched: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """The metric of each copy: its read logits written over the corrupt ones (unchanged before p0, unread
        elsewhere) in the one buffer, which is restored afterwards. patched [k, batch, read, vocab'] -> [k, batch]."""
        reads = self.shortcuts.reads
        index = reads.index(read) if reads is not None else (slice(None), read)
        per_copy = []
        for copy in patched:
            self.logits_buf[index] = copy
            per_copy.append(evaluate_metric(self.metric_fn, self.logits_buf, self.n_prompts).clone())  # not a view
        self.logits_buf[index] = self.runs.corrupt_logits[index]
        return torch.stack(per_copy)


def _patch_in_chunks(patcher: _Patcher, order: torch.Tensor, chunk_size: int,
                     progress: Progress) -> tuple[torch.Tensor, int]:
    """(patched metric [n_node, batch] float64 on the CPU, forward passes): nodes not in `order` keep the corrupt
    run's metric (their patch changes nothing)."""
    n_nodes = patcher.nodes.table.shape[0]
    results = patcher.runs.corrupt_metric.to("cpu")[None].repeat(n_nodes, 1)  # [n_node, batch]
    n_passes = 0
    with torch.no_grad():
        for start in range(0, order.numel(), chunk_size):
            progress.stage("activation patching", start / max(1, order.numel()))
            rows = order[start:start + chunk_size]
            values, passes = patcher.run(patcher.nodes.table[rows])
            results[rows] = values.to("cpu", torch.float64)
            n_passes += passes
    return results, n_passes


def _per_prompt_effects(results: torch.Tensor, corrupt_metric: torch.Tensor, nodes: _Nodes,
                        n_layers: int) -> dict[str, torch.Tensor]:
    """effect = patched - corrupt metric, per node type: [batch, layer, *grid] from results [n_node, batch]."""
    effects = results - corrupt_metric.to("cpu")[None]  # [n_node, batch]
    per_prompt: dict[str, torch.Tensor] = {}
    offset = 0
    for s in nodes.specs:
        grid = nodes.grids[s.name]
        count = n_layers * numel(grid)
        block = effects[offset:offset + count].reshape(n_layers, *grid, effects.shape[1])  # [layer, *grid, batch]
        per_prompt[s.name] = block.movedim(-1, 0).contiguous()
        offset += count
    return per_prompt


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
    clean, corrupt = check_tokens(clean_tokens, corrupt_tokens, device_of(model))  # [batch, pos]
    n_prompts, n_pos, n_layers = clean.shape[0], clean.shape[1], int(bridge.cfg.n_layers)
    specs = [NODE_TYPES[n] for n in node_types]
    names = layer_hook_names(specs, n_layers)
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]

    progress.stage("activation patching: clean and corrupt runs", 0.0)
    runs = _clean_and_corrupt_runs(bridge, clean, corrupt, metric_fn, names, resid_names)
    shortcuts = _choose_shortcuts(bridge, metric_fn, runs, names, resid_names, n_prompts)
    table = _node_table(specs, runs, n_layers)
    order = _run_order(table, shortcuts, chunk_size, n_layers, n_pos)
    patcher = _Patcher(bridge, metric_fn, corrupt, resid_names, runs, table, shortcuts)
    results, n_passes = _patch_in_chunks(patcher, order, chunk_size, progress)
    per_prompt = _per_prompt_effects(results, runs.corrupt_metric, table, n_layers)
    progress.stage("activation patching", 1.0)
    return ActPatchTensors(node_types, per_prompt, runs.clean_metric.cpu(), runs.corrupt_metric.cpu(), n_passes,
                           chunk_size, n_unchanged_nodes=table.table.shape[0] - int(table.active.numel()),
                           shortcuts=shortcuts.taken())


def act_patch_result(model: Any, t: ActPatchTensors, *, normalize: bool) -> ActPatchResult:
    summary, factor = MetricSummary.build(t.clean_metric, t.corrupt_metric, normalize)
    effects = {n: NodeMap.from_tensor(n, ["layer", *NODE_TYPES[n].axes], v.mean(0) * factor)
               for n, v in t.per_prompt.items()}
    n_pos = next((v.shape[2] for n, v in t.per_prompt.items() if "pos" in NODE_TYPES[n].axes), -1)
    return ActPatchResult(
        role=role_of(model), node_types=t.node_types, n_prompts=int(t.clean_metric.shape[0]), n_pos=int(n_pos),
        chunk_size=t.chunk_size, n_forward_passes=t.n_forward_passes,
        n_unchanged_nodes=t.n_unchanged_nodes, shortcuts=t.shortcuts, metric=summary, effects=effects,
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
    t = act_patch_tensors(model, clean_tokens, corrupt_tokens, metric_from(metric_fn), nodes,
                          chunk_size=chunk_size, progress=progress)
    return act_patch_result(model, t, normalize=normalize)



