"""Feature pages: top-activating contexts, activation histogram, promoted / suppressed tokens.

`build_feature_index` runs the model over a text (a pair's eval text by default in the CLI) and keeps,
per layer and feature, the `top_k` largest activations with their (sequence, position), the number of
tokens it fired on, the sum of its activations and a histogram of its non-zero activations (`n_bins`
equal bins on (0, max activation]; two passes). The tokenized sequences are kept too, so a page can
show contexts without the text. Saved beside the transcoders as `feature_index.safetensors`
(tensors `layer{l}.top_acts|top_seq|top_pos|hist|max|count|sum`, `tokens`, `offsets`; metadata
`lnscope` = JSON of the options).

`feature_page` reads the index and adds the tokens a feature's decoder row promotes and suppresses
through the unembedding (W_dec[f] @ W_U: the direct path, LayerNorm scale ignored) and the
activations on every token of each top context's window (recomputed: one forward per context).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import save_file

from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.transcoders.model import TranscoderSet

INDEX_FILE = "feature_index.safetensors"


@dataclass
class FeatureIndex:
    layers: list[int]
    top_k: int
    n_bins: int
    tokens: torch.Tensor  # [n] flat token ids of all sequences
    offsets: torch.Tensor  # [n_seq + 1]
    top_acts: dict[int, torch.Tensor]  # layer -> [d_tc, k] (descending; 0 = empty slot)
    top_seq: dict[int, torch.Tensor]  # layer -> [d_tc, k]
    top_pos: dict[int, torch.Tensor]  # layer -> [d_tc, k]
    hist: dict[int, torch.Tensor]  # layer -> [d_tc, n_bins]
    max_act: dict[int, torch.Tensor]  # layer -> [d_tc]
    count: dict[int, torch.Tensor]  # layer -> [d_tc] tokens with activation > 0
    act_sum: dict[int, torch.Tensor]  # layer -> [d_tc]
    n_tokens: int  # tokens indexed (BOS excluded if it was)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_sequences(self) -> int:
        return int(self.offsets.numel() - 1)

    def sequence(self, i: int) -> list[int]:
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])].tolist()

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            p = p / INDEX_FILE
        tensors = {"tokens": self.tokens.contiguous(), "offsets": self.offsets.contiguous()}
        for l in self.layers:
            for name, d in (("top_acts", self.top_acts), ("top_seq", self.top_seq), ("top_pos", self.top_pos),
                            ("hist", self.hist), ("max", self.max_act), ("count", self.count), ("sum", self.act_sum)):
                tensors[f"layer{l}.{name}"] = d[l].contiguous()
        meta = {**self.meta, "layers": self.layers, "top_k": self.top_k, "n_bins": self.n_bins,
                "n_tokens": self.n_tokens}
        save_file(tensors, str(p), metadata={"lnscope": json.dumps(meta)})
        return p

    @classmethod
    def load(cls, path: str | Path) -> "FeatureIndex":
        from lnscope.analysis.transcoders.formats import TranscoderFormatError

        p = Path(path)
        if p.is_dir():
            p = p / INDEX_FILE
        elif p.name != INDEX_FILE:  # transcoders given as one file: the index sits beside it
            p = p.parent / INDEX_FILE
        if not p.is_file():
            raise TranscoderFormatError(f"no feature index at {p} (build it with build_feature_index / the CLI)")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("lnscope", "{}"))
                t = {k: f.get_tensor(k) for k in f.keys()}
            layers = [int(l) for l in meta["layers"]]
            g = lambda name: {l: t[f"layer{l}.{name}"] for l in layers}  # noqa: E731
            return cls(layers=layers, top_k=int(meta["top_k"]), n_bins=int(meta["n_bins"]), tokens=t["tokens"],
                       offsets=t["offsets"], top_acts=g("top_acts"), top_seq=g("top_seq"), top_pos=g("top_pos"),
                       hist=g("hist"), max_act=g("max"), count=g("count"), act_sum=g("sum"),
                       n_tokens=int(meta["n_tokens"]),
                       meta={k: v for k, v in meta.items() if k not in ("layers", "top_k", "n_bins", "n_tokens")})
        except Exception as exc:  # a damaged or foreign file: say which, never a raw traceback
            raise TranscoderFormatError(f"cannot read the feature index {p}: {type(exc).__name__}: {exc}") from exc

def _batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = torch.tensor(list(s))
        mask[i, :len(s)] = True
    return toks, mask


@torch.no_grad()
def _layer_acts(model: LoadedModel, transcoders: TranscoderSet, toks: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> feature activations [batch, pos, d_tc] (float32, on the model's device)."""
    names = {f"blocks.{l}.mlp.hook_in" for l in transcoders.layers}
    _, cache = model.bridge.run_with_cache(toks.to(model.device), names_filter=lambda n: n in names)
    return {l: transcoders[l].encode(cache[f"blocks.{l}.mlp.hook_in"]).float() for l in transcoders.layers}


@torch.no_grad()
def build_feature_index(model: LoadedModel, transcoders: TranscoderSet, texts: Sequence[str], top_k: int = 20, *,
                        n_bins: int = 20, context: int | None = None, max_tokens: int | None = 100_000,
                        exclude_bos: bool = True, batch_size: int = 8, pair: str | None = None,
                        progress: Progress | None = None) -> FeatureIndex:
    """The index of `transcoders`' features over `texts` (see the module docstring)."""
    progress = ensure(progress)
    start = time.perf_counter()
    transcoders.to(device=model.device, dtype=model.dtype)
    context = min(context or int(model.bridge.cfg.n_ctx), int(model.bridge.cfg.n_ctx))
    seqs = text_sequences(model.tokenizer, texts, context, max_tokens)
    if not seqs:
        raise ValueError("no text to index")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    layers = transcoders.layers
    d = {l: transcoders[l].d_transcoder for l in layers}
    top_acts = {l: torch.zeros(d[l], top_k) for l in layers}
    top_seq = {l: torch.full((d[l], top_k), -1, dtype=torch.long) for l in layers}
    top_pos = {l: torch.full((d[l], top_k), -1, dtype=torch.long) for l in layers}
    max_act = {l: torch.zeros(d[l]) for l in layers}
    count = {l: torch.zeros(d[l], dtype=torch.long) for l in layers}
    act_sum = {l: torch.zeros(d[l], dtype=torch.float64) for l in layers}
    n_tokens = 0
    batches = [list(range(s, min(s + batch_size, len(seqs)))) for s in range(0, len(seqs), batch_size)]
    for bi, idx in enumerate(batches):  # pass 1: top-k, max, count, sum
        progress.stage("feature index: top activations", 0.5 * bi / len(batches))
        toks, mask = _batch([seqs[i] for i in idx], pad)
        if exclude_bos:
            mask[:, 0] = False
        acts = _layer_acts(model, transcoders, toks)
        rows = mask.nonzero()  # [n, 2] (batch row, pos)
        seq_ids = torch.tensor(idx)[rows[:, 0]]
        n_tokens += rows.shape[0]
        for l in layers:
            a = acts[l].cpu()[rows[:, 0], rows[:, 1]]  # [n, d_tc]
            max_act[l] = torch.maximum(max_act[l], a.max(0).values)
            count[l] += (a > 0).sum(0)
            act_sum[l] += a.double().sum(0)
            k = min(top_k, a.shape[0])
            vals, where = a.topk(k, dim=0)  # [k, d_tc]
            cand_acts = torch.cat([top_acts[l], vals.T], 1)
            cand_seq = torch.cat([top_seq[l], seq_ids[where].T], 1)
            cand_pos = torch.cat([top_pos[l], rows[where, 1].T], 1)
            best = cand_acts.topk(top_k, dim=1).indices
            top_acts[l] = cand_acts.gather(1, best)
            top_seq[l] = cand_seq.gather(1, best)
            top_pos[l] = cand_pos.gather(1, best)
    hist = {l: torch.zeros(d[l], n_bins, dtype=torch.long) for l in layers}
    for bi, idx in enumerate(batches):  # pass 2: histograms on (0, max]
        progress.stage("feature index: histograms", 0.5 + 0.5 * bi / len(batches))
        toks, mask = _batch([seqs[i] for i in idx], pad)
        if exclude_bos:
            mask[:, 0] = False
        acts = _layer_acts(model, transcoders, toks)
        rows = mask.nonzero()
        for l in layers:
            a = acts[l].cpu()[rows[:, 0], rows[:, 1]]
            on = a > 0
            b = torch.ceil(a / max_act[l].clamp_min(1e-30) * n_bins).long().clamp(1, n_bins) - 1
            hist[l].scatter_add_(1, b.T, on.T.long())
    for l in layers:  # empty slots (fewer firing tokens than top_k) marked by seq -1
        empty = top_acts[l] <= 0
        top_seq[l][empty], top_pos[l][empty], top_acts[l][empty] = -1, -1, 0.0
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    progress.stage("feature index: done", 1.0)
    meta = {"role": model.role, "pair": pair, "context": context, "exclude_bos": exclude_bos,
            "model": model.source.portable(), "n_texts": len(texts), "seconds": time.perf_counter() - start}
    return FeatureIndex(layers=layers, top_k=top_k, n_bins=n_bins, tokens=flat, offsets=offsets, top_acts=top_acts,
                        top_seq=top_seq, top_pos=top_pos, hist=hist, max_act=max_act, count=count, act_sum=act_sum,
                        n_tokens=n_tokens, meta=meta)


# ------------------------------------------------------------------------------------------ pages
class TokenValue(BaseModel):
    token: str
    token_id: int
    value: float


class FeatureContext(BaseModel):
    sequence: int
    position: int = Field(description="position of the max-activating token in its sequence")
    activation: float
    tokens: list[str] = Field(description="the window's tokens")
    token_ids: list[int]
    activations: list[float] = Field(description="the feature's activation on each window token")
    highlight: int = Field(description="index of `position` inside the window")


class Histogram(BaseModel):
    bin_edges: list[float] = Field(description="n_bins + 1 edges on [0, max activation]")
    counts: list[int] = Field(description="non-zero activations per bin")
    n_zero: int = Field(description="indexed tokens where the feature is 0")


class FeaturePage(BaseModel):
    role: str
    layer: int
    feature: int
    n_tokens_indexed: int
    firing_rate: float
    max_activation: float
    mean_activation_when_active: float | None
    top_contexts: list[FeatureContext]
    histogram: Histogram
    promoted: list[TokenValue] = Field(description="top tokens of W_dec[f] @ W_U")
    suppressed: list[TokenValue] = Field(description="bottom tokens of W_dec[f] @ W_U (most negative first)")
    decoder_norm: float


def logit_effects(model: LoadedModel, transcoders: TranscoderSet, layer: int, feature: int) -> torch.Tensor:
    """W_dec[feature] @ W_U: the feature's direct effect per unit activation on every logit (float64)."""
    W_U = model.bridge.W_U.detach().double()
    return transcoders[layer].W_dec.detach()[feature].double().to(W_U.device) @ W_U


@torch.no_grad()
def feature_page(model: LoadedModel, transcoders: TranscoderSet, index: FeatureIndex, layer: int, feature: int, *,
                 n_contexts: int | None = None, window: tuple[int, int] = (10, 4), n_tokens: int = 10) -> FeaturePage:
    """One feature's page (see the module docstring). `window`: tokens shown before / after the peak."""
    if layer not in index.layers or layer not in transcoders:
        raise KeyError(f"layer {layer} has no transcoder / is not indexed (layers {index.layers})")
    d_tc = transcoders[layer].d_transcoder
    if not 0 <= feature < d_tc:
        raise KeyError(f"feature {feature} out of range (layer {layer} has {d_tc})")
    tok = model.tokenizer
    transcoders.to(device=model.device, dtype=model.dtype)
    effects = logit_effects(model, transcoders, layer, feature).cpu()
    top = effects.topk(n_tokens)
    bottom = (-effects).topk(n_tokens)
    promoted = [TokenValue(token=tok.decode([int(i)]), token_id=int(i), value=float(v))
                for v, i in zip(top.values, top.indices)]
    suppressed = [TokenValue(token=tok.decode([int(i)]), token_id=int(i), value=-float(v))
                  for v, i in zip(bottom.values, bottom.indices)]

    contexts = []
    acts, seqs, poss = index.top_acts[layer][feature], index.top_seq[layer][feature], index.top_pos[layer][feature]
    keep = [j for j in range(index.top_k) if int(seqs[j]) >= 0][: n_contexts or index.top_k]
    before, after = window
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    distinct = sorted({int(seqs[j]) for j in keep})
    per_seq: dict[int, torch.Tensor] = {}
    if distinct:
        toks, _ = _batch([index.sequence(s) for s in distinct], pad)
        a = _layer_acts(model, transcoders, toks)[layer][..., feature].cpu()
        per_seq = {s: a[i] for i, s in enumerate(distinct)}
    for j in keep:
        s, p = int(seqs[j]), int(poss[j])
        ids = index.sequence(s)
        lo, hi = max(0, p - before), min(len(ids), p + after + 1)
        contexts.append(FeatureContext(
            sequence=s, position=p, activation=float(acts[j]), tokens=[tok.decode([t]) for t in ids[lo:hi]],
            token_ids=ids[lo:hi], activations=[float(v) for v in per_seq[s][lo:hi]], highlight=p - lo))
    mx = float(index.max_act[layer][feature])
    cnt = int(index.count[layer][feature])
    edges = torch.linspace(0, mx, index.n_bins + 1).tolist() if mx > 0 else [0.0] * (index.n_bins + 1)
    return FeaturePage(
        role=model.role, layer=layer, feature=feature, n_tokens_indexed=index.n_tokens,
        firing_rate=cnt / max(index.n_tokens, 1), max_activation=mx,
        mean_activation_when_active=float(index.act_sum[layer][feature]) / cnt if cnt else None,
        top_contexts=contexts,
        histogram=Histogram(bin_edges=edges, counts=index.hist[layer][feature].tolist(), n_zero=index.n_tokens - cnt),
        promoted=promoted, suppressed=suppressed,
        decoder_norm=float(transcoders[layer].W_dec.detach()[feature].norm()),
    )
