"""`attribute`: the attribution graph of one prompt on its local replacement model (circuit-tracer's construction).

Nodes of the replacement model (replacement.py), each adding its output to the residual stream:

- feature nodes (layer, pos, f) with activation a > 0: output a * W_dec[f] at pos (position 0's
  features are dropped unless bos="features"),
- error nodes (layer, pos): MLP output - transcoder reconstruction,
- token embedding nodes (pos): the token embedding (`hook_embed`),
- plus constants ("bias"): positional embeddings, attention b_O, transcoder b_dec, b_enc, b_U, and
  with bos="bias" (circuit-tracer's choice) the MLP outputs at position 0.

Targets: feature pre-activations x_l[pos] . W_enc[f] (x_l what the MLP receives) and logit targets
(targets.py). The direct effect of a source s on a target t is

    A[t, s] = (d input_t / d output_s) . output_s,

read from one backward pass per batch of targets: the prompt is copied `batch_size` times and each
copy carries one target. A bias-only pass (every node output zero) gives each target's bias term, so
that input_t = sum_s A[t, s] + bias_t exactly (the graph's `identity_*` fields measure the gap).

For an LN-free model (no hook_scale) the replacement model is the model itself on this prompt except
for the MLP nonlinearities; with LayerNorm the frozen scales make it linear. Encoder rows are taken
mean-free when the residual stream is centred (see `feature_vectors`); pre-activations are unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import make_manifest
from lnscope.analysis.transcoders.formats import TranscoderFormatError
from lnscope.analysis.transcoders.graph import AttributionGraph
from lnscope.analysis.transcoders.model import TranscoderSet
from lnscope.analysis.transcoders.replacement import (
    BosMode,
    FrozenPrompt,
    ReplacementModel,
    decode_tokens,
    freeze_prompt,
    prompt_tokens,
)
from lnscope.analysis.transcoders.targets import LogitTarget, select_targets

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22  # elements of scratch per gathered decoder chunk


def attribute(
    model: LoadedModel,
    transcoders: TranscoderSet,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    target_tokens: Sequence[int] | None = None,
    logit_diff: tuple[int, int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 32,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    bos: BosMode = "bias",
    prepend_bos: bool = True,
    pair: str | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The attribution graph of `prompt` on `model` with `transcoders` (see the module docstring).

    `max_feature_nodes` (default all): how many feature rows to compute; beyond it the features with the
    highest estimated influence are chosen, as circuit-tracer does. `bos`: "bias" (default, circuit-tracer)
    position 0's MLP outputs are constants; "error": they stay in the error nodes (no features there);
    "features": position 0 is treated like the others. `batch_size`: targets per backward pass (the
    prompt is run once with that many copies). `target_tokens` / `logit_diff`: explicit logit targets.

    The transcoders are moved to the model's device and dtype. Memory: a dense float32 matrix of
    (n_features + (n_layers + 1) n_pos + n_logits)^2 entries; cap `max_feature_nodes` for long prompts.
    """
    progress = ensure(progress)
    start = time.perf_counter()
    check_inputs(model, transcoders, bos)
    transcoders.to(device=model.device, dtype=model.dtype)
    ids = prompt_tokens(model, prompt, prepend_bos=prepend_bos)
    progress.stage("graph: forward", 0.0)

    frozen = freeze_prompt(model, transcoders, ids, bos)
    targets, directions = select_targets(model, frozen.logits[-1], target_tokens=target_tokens, logit_diff=logit_diff,
                                         max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob)
    directions = directions.to(device=model.device, dtype=frozen.logits.dtype)
    features = feature_vectors(model, transcoders, frozen)
    replacement = ReplacementModel(model, transcoders, frozen)
    rows = attribution_rows(replacement, features, targets, directions, batch_size=batch_size,
                            max_feature_nodes=max_feature_nodes, update_interval=update_interval, progress=progress)
    bias = bias_terms(replacement, features, directions, rows)
    nodes = assemble(frozen, rows, bias, directions)

    options = dict(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                   max_feature_nodes=max_feature_nodes, bos=bos,
                   target_tokens=list(target_tokens) if target_tokens else None,
                   logit_diff=list(logit_diff) if logit_diff else None, transcoders=transcoders.describe())
    graph = AttributionGraph(
        prompt=model.tokenizer.decode(ids) if not isinstance(prompt, str) else prompt,
        token_ids=ids, token_strs=decode_tokens(model.tokenizer, ids), n_layers=int(model.bridge.cfg.n_layers),
        active_features=frozen.active.cpu(), activation_values=frozen.values.double().cpu(),
        selected_features=nodes.selected.cpu(), adjacency=nodes.adjacency, logit_targets=targets,
        node_inputs=nodes.inputs, node_bias=nodes.bias, identity_gap=nodes.gap, row_scale=nodes.scale,
        role=model.role, scan=transcoders.scan or "", bos=bos, seconds=time.perf_counter() - start,
        manifest=make_manifest("transcoder_graph", {model.role: model}, pair=pair, options=options), options=options,
    )
    progress.stage("graph: done", 1.0)
    logger.info("graph: %d active features, %d rows, identity max rel error %.2e, %.1f s", features.n_active,
                rows.done, graph.identity_max_rel_error, graph.seconds)
    return graph


def check_inputs(model: LoadedModel, transcoders: TranscoderSet, bos: str) -> None:
    """Raise unless `bos` is a known mode and the transcoders fit the model's width and layers."""
    if bos not in ("bias", "error", "features"):
        raise ValueError(f"bos must be 'bias', 'error' or 'features', not {bos!r}")
    n_layers = int(model.bridge.cfg.n_layers)
    d_model = int(model.bridge.cfg.d_model)
    if transcoders.d_model != d_model:
        raise TranscoderFormatError(f"transcoders have d_model {transcoders.d_model}, the model {d_model}")
    bad = [l for l in transcoders.layers if not 0 <= l < n_layers]
    if bad:
        raise TranscoderFormatError(f"transcoders for layers {bad}, but the model has {n_layers} layers")


# ------------------------------------------------------------------------------------ feature vectors
@dataclass
class FeatureVectors:
    """What each active feature reads (its encoder row) and writes (its output) in the residual stream."""

    enc: torch.Tensor  # [n_active, d_model] W_enc[f] (mean-free when the residual stream is centred)
    enc_bias: torch.Tensor  # [n_active] float64, cpu: the effective b_enc[f]
    dec: torch.Tensor  # [n_active, d_model] a * W_dec[f]
    active: torch.Tensor  # [n_active, 3] (layer, pos, feature)

    @property
    def n_active(self) -> int:
        return int(self.active.shape[0])


def feature_vectors(model: LoadedModel, transcoders: TranscoderSet, frozen: FrozenPrompt) -> FeatureVectors:
    """Encoder rows and outputs of the active features, in the model's dtype and device.

    With a centred residual stream (TL's center_writing_weights) what an MLP reads is mean-free on the
    prompt, so an encoder row's component along the all-ones direction reads nothing there; it is
    dropped, else (no LayerNorm to remove it) it would be a spurious channel from the decoder rows and
    the error nodes to later encoders. With LayerNorm (ln2 centres) this changes nothing.
    """
    dtype, device = frozen.logits.dtype, model.device
    d_model = int(model.bridge.cfg.d_model)
    n_active = int(frozen.active.shape[0])
    centred = bool(model.weight_processing.get("center_writing_weights", False))
    enc = torch.zeros(n_active, d_model, dtype=dtype, device=device)
    enc_bias = torch.zeros(n_active, dtype=torch.float64)
    dec = torch.zeros(n_active, d_model, dtype=dtype, device=device)
    for l in transcoders.layers:
        m = (frozen.active[:, 0] == l).nonzero().flatten()
        if m.numel():
            f = frozen.active[m, 2]
            rows = transcoders[l].W_enc.detach()[f].to(dtype)
            enc[m] = rows - rows.mean(-1, keepdim=True) if centred else rows
            enc_bias[m.cpu()] = transcoders[l].effective_b_enc().detach()[f].double().cpu()
            dec[m] = transcoders[l].W_dec.detach()[f].to(dtype) * frozen.values[m, None]
    return FeatureVectors(enc=enc, enc_bias=enc_bias, dec=dec, active=frozen.active)


# ------------------------------------------------------------------------------------ gradient rows
@dataclass
class SourceLayout:
    """Every source's output vector, packed for one batched matmul per leaf.

    A leaf j (0: the token embeddings, 1 + l: layer l's MLP output) at position p is a slot; its sources
    are the embedding (j = 0) or the error and the active features there. A slot's vectors are split into
    blocks of at most `K` rows ("virtual slots"), zero-padded, so that for a leaf's gradient g [r, pos,
    d_model] the products of all its sources are one bmm: g[:, slot_pos].T [n_virtual, r, d] @
    vectors [n_virtual, d, K].
    """

    vectors: torch.Tensor  # [n_virtual, d_model, K] (transposed blocks, contiguous)
    leaf_range: list[tuple[int, int]]  # per leaf j: its virtual slots [v0, v1)
    slot_pos: list[torch.Tensor | None]  # per leaf j: position of each virtual slot, None when one per position
    flat: torch.Tensor  # [n_sources] long (on the vectors' device): flat index v * K + k of each source column
    K: int


def source_layout(frozen: FrozenPrompt, features: FeatureVectors, n_layers: int) -> SourceLayout:
    """The packing of `SourceLayout`: columns [features | errors (layer-major, pos) | token embeddings]."""
    P, n_active = int(frozen.tokens.shape[1]), features.n_active
    device, dtype = features.dec.device, features.dec.dtype
    d_model = int(frozen.embed.shape[-1])
    S = (n_layers + 1) * P
    # vectors in slot order: slot s = j * P + p holds [embedding or error, then its features]
    act = features.active.to(device)
    f_slot = (act[:, 0] + 1) * P + act[:, 1]
    order = torch.argsort(f_slot, stable=True)
    counts = torch.bincount(f_slot, minlength=S) + 1  # + the error / embedding vector
    K = _block_size(counts)
    blocks = (counts + K - 1) // K  # virtual slots per slot
    v_start = torch.cumsum(blocks, 0) - blocks  # first virtual slot of each slot
    n_virtual = int(blocks.sum())
    # rank of each vector within its slot: 0 for the error / embedding, 1.. for features (in active order)
    f_rank = torch.empty(n_active, dtype=torch.long, device=device)
    f_rank[order] = _rank_in_group(f_slot[order], S) + 1
    f_flat = (v_start[f_slot] + f_rank // K) * K + f_rank % K
    first = v_start * K  # rank 0 of each slot
    err_flat = first[P:]  # layers 0..L-1, pos: layer-major, as the error columns
    emb_flat = first[:P]
    flat = torch.cat([f_flat, err_flat, emb_flat])
    packed = torch.zeros(n_virtual * K, d_model, dtype=dtype, device=device)
    packed[f_flat] = features.dec
    packed[err_flat] = torch.stack(frozen.error).reshape(-1, d_model).to(dtype)
    packed[emb_flat] = frozen.embed.to(dtype)
    vectors = packed.view(n_virtual, K, d_model).transpose(1, 2).contiguous()
    leaf_range, slot_pos = [], []
    for j in range(n_layers + 1):
        v0, v1 = int(v_start[j * P]), int(v_start[j * P + P - 1] + blocks[j * P + P - 1])
        leaf_range.append((v0, v1))
        b = blocks[j * P:(j + 1) * P]
        slot_pos.append(None if bool((b == 1).all()) else torch.arange(P, device=device).repeat_interleave(b))
    return SourceLayout(vectors=vectors, leaf_range=leaf_range, slot_pos=slot_pos, flat=flat, K=K)


def _rank_in_group(sorted_keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """For sorted keys: each one's rank among the equal keys before it (0, 1, ... per group)."""
    n = sorted_keys.numel()
    counts = torch.bincount(sorted_keys, minlength=n_keys)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(n, device=sorted_keys.device) - starts[sorted_keys]


def _block_size(counts: torch.Tensor) -> int:
    """The largest block size (from the largest slot down, halving) whose zero padding at most doubles the work."""
    total = int(counts.sum())
    K = int(counts.max())
    while K > 1:
        if int(((counts + K - 1) // K).sum()) * K <= 2 * total:
            return K
        K = (K + 1) // 2
    return 1


class GradientRows:
    """Rows of A for a batch of targets, from one backward pass through a `batch`-copy replacement run.

    Columns (sources): [active features | errors (layer-major, pos) | token embeddings]; a row is
    A[t, s] = (d input_t / d output_s) . output_s, summed over d_model. The target inputs' gradients are
    injected as grad_outputs (logit directions at the last position, encoder rows at x_l[pos]).
    """

    def __init__(self, replacement: ReplacementModel, features: FeatureVectors, directions: torch.Tensor,
                 batch: int) -> None:
        self.frozen, self.features, self.directions = replacement.prompt, features, directions
        self.n_layers = int(replacement.model.bridge.cfg.n_layers)
        self.n_pos = int(self.frozen.tokens.shape[1])
        self.n_sources = features.n_active + (self.n_layers + 1) * self.n_pos
        self.batch = batch
        self.layout = source_layout(self.frozen, features, self.n_layers)
        with torch.enable_grad():
            self.run = replacement.run(batch)
        self.leaves = [self.run.leaves["embed"]] + [self.run.leaves[f"mlp{l}"] for l in range(self.n_layers)]
        self._active_cpu = features.active.cpu()

    def __call__(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows [len(idx), n_sources] in the model's dtype (on the CPU) for logit targets (`kind` "logit",
        indices into the directions) or feature targets ("feature", active indices)."""
        outputs, grad_outputs = self._injection(kind, idx)
        grads = torch.autograd.grad(outputs, self.leaves, grad_outputs, retain_graph=True, allow_unused=True)
        if kind == "logit":  # a few rows, once: summed per source as ever, so logit rows round as before
            return self._rows_elementwise(grads, int(idx.numel()))
        return self._rows(grads, int(idx.numel()))

    def _injection(self, kind: str, idx: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(outputs, grad_outputs): copy b carries target idx[b]'s input gradient; the other copies none."""
        r, B = int(idx.numel()), self.batch
        if kind == "logit":
            g = torch.zeros(B, self.directions.shape[-1], dtype=self.run.logits_last.dtype,
                            device=self.run.logits_last.device)
            g[:r] = self.directions[idx.to(self.directions.device)]
            return [self.run.logits_last], [g]
        enc, act = self.features.enc, self._active_cpu[idx]
        outputs, grad_outputs = [], []
        copies = torch.arange(r)
        for l in act[:, 0].unique().tolist():
            m = act[:, 0] == l
            live = self.run.live[l]
            g = torch.zeros_like(live)
            g[copies[m].to(g.device), act[m, 1].to(g.device)] = enc[idx[m].to(enc.device)].to(g.dtype)
            outputs.append(live)
            grad_outputs.append(g)
        return outputs, grad_outputs

    def _rows_elementwise(self, grads: Sequence[torch.Tensor | None], r: int) -> torch.Tensor:
        """`_rows` as (gradient * output).sum(d_model) per source, in chunks (no padding, more memory traffic)."""
        frozen, features, P, L = self.frozen, self.features, self.n_pos, self.n_layers
        n_active, d_model = features.n_active, features.dec.shape[-1]
        g_embed = grads[0] if grads[0] is not None else torch.zeros_like(self.leaves[0])
        row = torch.zeros(r, self.n_sources, dtype=features.dec.dtype)
        for l in range(L):
            g = grads[1 + l]
            if g is None:
                continue
            g = g[:r]  # [r, pos, d_model]
            m = (frozen.active[:, 0] == l).nonzero().flatten()
            step = max(1, _CHUNK // max(1, r * d_model))
            for s in range(0, m.numel(), step):
                mm = m[s:s + step]
                row[:, mm.cpu()] = (g[:, frozen.active[mm, 1]] * features.dec[mm][None]).sum(-1).cpu()
            row[:, n_active + l * P: n_active + (l + 1) * P] = (g * frozen.error[l][None]).sum(-1).cpu()
        row[:, n_active + L * P:] = (g_embed[:r] * frozen.embed[None]).sum(-1).cpu()
        return row

    def _rows(self, grads: Sequence[torch.Tensor | None], r: int) -> torch.Tensor:
        """gradient . output per source, for the first `r` copies: one bmm per leaf."""
        lay = self.layout
        n_virtual, d_model, K = lay.vectors.shape
        out = torch.empty(n_virtual, r, K, dtype=lay.vectors.dtype, device=lay.vectors.device)
        for j, g in enumerate(grads):
            v0, v1 = lay.leaf_range[j]
            if g is None:
                out[v0:v1].zero_()
                continue
            g = g[:r].to(lay.vectors.dtype).transpose(0, 1)  # [pos, r, d_model]
            if lay.slot_pos[j] is not None:
                g = g[lay.slot_pos[j]]
            torch.bmm(g, lay.vectors[v0:v1], out=out[v0:v1])
        # out[v, b, k] -> row b, column c with flat[c] = v * K + k
        return out.transpose(0, 1).reshape(r, n_virtual * K)[:, lay.flat].cpu()


@dataclass
class AttributionRows:
    """The computed rows of A, before they are put in circuit-tracer's node order."""

    logit: torch.Tensor  # [n_logits, n_sources] float64
    feature: torch.Tensor  # [max_rows, n_sources] float32, or the [N, N] adjacency itself when `full`
    feature_sum: torch.Tensor  # [max_rows] float64: sum_s A[t, s] per feature row
    feature_abs: torch.Tensor  # [max_rows] float64: sum_s |A[t, s]| per feature row
    owner: torch.Tensor  # [max_rows] long: the active feature of each computed row (-1: none)
    done: int  # feature rows computed
    adjacency: torch.Tensor  # [N, N] float32, N = max_rows + (n_layers + 1) n_pos + n_logits
    full: bool  # every active feature has its row: row j is active feature j
    n_sources: int


def attribution_rows(replacement: ReplacementModel, features: FeatureVectors, targets: list[LogitTarget],
                     directions: torch.Tensor, *, batch_size: int, max_feature_nodes: int | None,
                     update_interval: int, progress: Progress) -> AttributionRows:
    """All logit rows, then the feature rows: all of them, or the `max_feature_nodes` most influential.

    The batched replacement run (and its autograd graph) lives only inside this call.
    """
    n_active, n_logits = features.n_active, len(targets)
    max_rows = n_active if max_feature_nodes is None else min(int(max_feature_nodes), n_active)
    B = max(1, min(batch_size, max(max_rows, n_logits)))
    read = GradientRows(replacement, features, directions, B)
    logit_rows = torch.zeros(n_logits, read.n_sources, dtype=torch.float64)  # float64 while summed
    for s in range(0, n_logits, B):
        chunk = torch.arange(s, min(s + B, n_logits))
        logit_rows[s:s + chunk.numel()] = read("logit", chunk)
    progress.stage("graph: feature rows", 0.05)
    full = max_rows == n_active
    N = max_rows + (read.n_layers + 1) * read.n_pos + n_logits
    adjacency = torch.zeros(N, N, dtype=torch.float32)
    rows = AttributionRows(
        logit=logit_rows, feature=adjacency if full else torch.zeros(max_rows, read.n_sources, dtype=torch.float32),
        feature_sum=torch.zeros(max_rows, dtype=torch.float64), feature_abs=torch.zeros(max_rows, dtype=torch.float64),
        owner=torch.full((max_rows,), -1, dtype=torch.long), done=0, adjacency=adjacency, full=full,
        n_sources=read.n_sources)
    _feature_rows(read, rows, targets, n_active, max_rows, B, update_interval, progress)
    return rows


def _feature_rows(read: GradientRows, rows: AttributionRows, targets: list[LogitTarget], n_active: int,
                  max_rows: int, B: int, update_interval: int, progress: Progress) -> None:
    """Fill `rows` with feature rows: every active feature in order when `rows.full`, else in rounds of
    `update_interval` batches, each taking the unvisited features of highest estimated influence."""
    visited = torch.zeros(n_active, dtype=torch.bool)
    while rows.done < max_rows:
        if rows.full:
            pending = torch.arange(n_active)
        else:
            infl = _partial_influence(rows.logit, rows.feature[:rows.done], rows.owner[:rows.done], n_active,
                                      rows.n_sources, targets)
            rank = torch.argsort(infl[:n_active], descending=True)
            pending = rank[~visited[rank]][: min(update_interval * B, max_rows - rows.done)]
        for s in range(0, pending.numel(), B):
            idx = pending[s:s + B]
            computed = read("feature", idx)
            sl = slice(rows.done, rows.done + idx.numel())
            rows.feature[sl, :rows.n_sources] = computed
            rows.feature_sum[sl] = computed.sum(1, dtype=torch.float64)
            rows.feature_abs[sl] = computed.abs().sum(1, dtype=torch.float64)
            rows.owner[sl] = idx
            visited[idx] = True
            rows.done += idx.numel()
            progress.stage("graph: feature rows", 0.05 + 0.9 * rows.done / max(max_rows, 1))
        if rows.full:
            break


def _partial_influence(logit_rows, feat_rows, owners, n_active, n_sources, targets) -> torch.Tensor:
    """circuit-tracer's partial influences [n_sources]: each source's estimated influence from the rows so far.

    The rows (logit rows, then the feature rows computed) are |A| row-normalised; influence is summed
    along paths of up to 256 steps, starting from the logit weights.
    """
    n_logits = len(targets)
    rows = torch.cat([logit_rows, feat_rows.double()]).abs()
    rows = rows / rows.sum(1, keepdim=True).clamp(min=1e-8)
    # row r belongs to node: logits -> n_sources + i, features -> their active index
    row_node = torch.cat([torch.arange(n_logits) + n_sources, owners])
    prod = torch.zeros(n_sources + n_logits, dtype=torch.float64)
    prod[n_sources:] = torch.tensor([t.weight for t in targets], dtype=torch.float64)
    influence = torch.zeros(n_sources, dtype=torch.float64)
    for _ in range(256):
        nxt = prod[row_node] @ rows
        if not nxt.any():
            break
        influence += nxt
        prod = torch.zeros_like(prod)
        prod[:n_sources] = nxt
    return influence


# ------------------------------------------------------------------------------ bias and assembly
@dataclass
class BiasTerms:
    """bias_t: each target's input with every node output zero."""

    logit: torch.Tensor  # [n_logits] float64
    feature: torch.Tensor  # [max_rows] float64, per computed row (pre-activation bias b_enc included)


def bias_terms(replacement: ReplacementModel, features: FeatureVectors, directions: torch.Tensor,
               rows: AttributionRows) -> BiasTerms:
    """One forward of the replacement model with every node output zero, read at each target."""
    with torch.no_grad():
        run = replacement.run(1, zero_nodes=True)
    logit_bias = (run.logits_last[0].to(torch.float64) @ directions.T.to(torch.float64)).cpu()
    feat_bias = torch.zeros(rows.owner.numel(), dtype=torch.float64)
    if rows.done:
        owners = rows.owner[:rows.done]
        act = features.active.cpu()[owners]
        live = torch.stack([run.live[l][0] for l in range(len(run.live))]).double().cpu()  # [layer, pos, d_model]
        feat_bias[:rows.done] = (live[act[:, 0], act[:, 1]] * features.enc.cpu()[owners].double()).sum(-1) \
            + features.enc_bias[owners]
    return BiasTerms(logit=logit_bias, feature=feat_bias)


@dataclass
class GraphNodes:
    """The graph's matrix and per-node vectors in circuit-tracer's node order."""

    adjacency: torch.Tensor  # [N, N] float32
    selected: torch.Tensor  # [n_selected] active index of each feature node
    inputs: torch.Tensor  # [N] float64: pre-activation / target logit value; 0 for source-only nodes
    bias: torch.Tensor  # [N] float64
    gap: torch.Tensor  # [N] float64: sum of row + bias - input
    scale: torch.Tensor  # [N] float64: |bias| + sum |row|


def assemble(frozen: FrozenPrompt, rows: AttributionRows, bias: BiasTerms, directions: torch.Tensor) -> GraphNodes:
    """Order the feature rows (and columns) by active index; inputs and the identity gap in float64."""
    done, adjacency = rows.done, rows.adjacency
    N, n_logits = adjacency.shape[0], rows.logit.shape[0]
    logit_inputs = (frozen.logits[-1].double() @ directions.T.double()).cpu()
    owners = rows.owner[:done]
    feat_inputs = frozen.pre_acts.double().cpu()[owners] if done else torch.zeros(0, dtype=torch.float64)
    logit_gap = rows.logit.sum(1) + bias.logit - logit_inputs
    feat_gap = rows.feature_sum[:done] + bias.feature[:done] - feat_inputs

    order = torch.argsort(owners)
    selected = owners[order]
    if not rows.full:
        cols = torch.cat([selected, torch.arange(frozen.active.shape[0], rows.n_sources)])  # selected features first
        adjacency[:done, : N - n_logits] = rows.feature[:done][order][:, cols]
        logit_cols = rows.logit[:, cols]
    else:
        logit_cols = rows.logit
    adjacency[N - n_logits:, : N - n_logits] = logit_cols.float()

    inputs, node_bias = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    gap, scale = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    inputs[:done], node_bias[:done], gap[:done] = feat_inputs[order], bias.feature[:done][order], feat_gap[order]
    scale[:done] = rows.feature_abs[:done][order] + bias.feature[:done][order].abs()
    inputs[N - n_logits:], node_bias[N - n_logits:], gap[N - n_logits:] = logit_inputs, bias.logit, logit_gap
    scale[N - n_logits:] = rows.logit.abs().sum(1) + bias.logit.abs()
    return GraphNodes(adjacency=adjacency, selected=selected, inputs=inputs, bias=node_bias, gap=gap, scale=scale)
