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
class GradientRows:
    """Rows of A for a batch of targets, from one backward pass through a `batch`-copy replacement run.

    Columns (sources): [active features | errors (layer-major, pos) | token embeddings]; a row is
    A[t, s] = (d input_t / d output_s) . output_s, summed over d_model.
    """

    def __init__(self, replacement: ReplacementModel, features: FeatureVectors, directions: torch.Tensor,
                 batch: int) -> None:
        self.frozen, self.features, self.directions = replacement.prompt, features, directions
        self.n_layers = int(replacement.model.bridge.cfg.n_layers)
        self.n_pos = int(self.frozen.tokens.shape[1])
        self.n_sources = features.n_active + (self.n_layers + 1) * self.n_pos
        with torch.enable_grad():
            self.run = replacement.run(batch)
        self.leaves = [self.run.leaves["embed"]] + [self.run.leaves[f"mlp{l}"] for l in range(self.n_layers)]

    def __call__(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        """Rows [len(targets), n_sources] float64 (cpu) for ('logit', i) / ('feature', active index) targets."""
        grads = torch.autograd.grad(self._summed_inputs(targets), self.leaves, retain_graph=True, allow_unused=True)
        return self._rows(grads, len(targets))

    def _summed_inputs(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        """sum over copies b of target b's input in copy b (copies are independent: one backward gives each)."""
        frozen, P = self.frozen, self.n_pos
        total = torch.zeros((), dtype=self.directions.dtype, device=self.directions.device)
        for b, (kind, i) in enumerate(targets):
            if kind == "logit":
                total = total + self.run.logits[b, P - 1] @ self.directions[i]
            else:
                l, p = int(frozen.active[i, 0]), int(frozen.active[i, 1])
                total = total + self.run.live[l][b, p] @ self.features.enc[i]
        return total

    def _rows(self, grads: Sequence[torch.Tensor | None], r: int) -> torch.Tensor:
        """gradient . output per source, for the first `r` copies."""
        frozen, features, P, L = self.frozen, self.features, self.n_pos, self.n_layers
        n_active, d_model = features.n_active, features.dec.shape[-1]
        g_embed = grads[0] if grads[0] is not None else torch.zeros_like(self.leaves[0])
        row = torch.zeros(r, self.n_sources, dtype=torch.float64)
        for l in range(L):
            g = grads[1 + l]
            if g is None:
                continue
            g = g[:r]  # [r, pos, d_model]
            m = (frozen.active[:, 0] == l).nonzero().flatten()
            if m.numel():
                step = max(1, _CHUNK // max(1, r * d_model))
                for s in range(0, m.numel(), step):
                    mm = m[s:s + step]
                    row[:, mm.cpu()] = (g[:, frozen.active[mm, 1]] * features.dec[mm][None]).sum(-1).double().cpu()
            row[:, n_active + l * P: n_active + (l + 1) * P] = (g * frozen.error[l][None]).sum(-1).double().cpu()
        row[:, n_active + L * P:] = (g_embed[:r] * frozen.embed[None]).sum(-1).double().cpu()
        return row


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
        chunk = [("logit", i) for i in range(s, min(s + B, n_logits))]
        logit_rows[s:s + len(chunk)] = read(chunk)
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
            computed = read([("feature", int(i)) for i in idx])
            sl = slice(rows.done, rows.done + idx.numel())
            rows.feature[sl, :rows.n_sources] = computed.float()
            rows.feature_sum[sl], rows.feature_abs[sl] = computed.sum(1), computed.abs().sum(1)
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
    P = int(replacement.prompt.tokens.shape[1])
    with torch.no_grad():
        run = replacement.run(1, zero_nodes=True)
    logit_bias = (run.logits[0, P - 1].to(torch.float64) @ directions.T.to(torch.float64)).cpu()
    feat_bias = torch.zeros(rows.owner.numel(), dtype=torch.float64)
    for j in range(rows.done):
        i = int(rows.owner[j])
        l, p = int(features.active[i, 0]), int(features.active[i, 1])
        feat_bias[j] = float(run.live[l][0, p].double() @ features.enc[i].double()) + float(features.enc_bias[i])
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
