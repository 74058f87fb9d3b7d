"""LayerNorm statistics along the residual stream, and held-out cross-entropy, for each role of a trio.

- LN scales (models with LN): s = sqrt(var(x) + eps) of the input x of every ln1, ln2 and ln_final,
  per token (TL's `hook_scale`), per prompt and averaged over prompts.
- Frozen constants (the LN-free twin): the released format stores weight = gamma * 1e6 / sigma with
  eps = 1e12, i.e. LN(x) = (x - mean) * gamma / sigma + beta. sigma is read from the checkpoint's
  `lnscope_removal.json` (written by `lnscope remove-ln`); the gain gamma / sigma from its raw weights.
- Residual norm: ||x||_2 over d_model of resid_pre of every layer and of the final residual stream
  (in the bridge's basis: compatibility mode centres the writing weights, so x has zero mean).
- Cross-entropy: CE = mean over predicted tokens of -log softmax(logits)[next token] (natural log),
  on user texts tokenized with BOS prepended and chunked to the context; bootstrap CI over sequences.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest

logger = logging.getLogger(__name__)

METADATA_FILE = "lnscope_removal.json"  # as written by analysis.remove_ln.export
Site = Literal["ln1", "ln2", "ln_final"]


# ------------------------------------------------------------------------------------- helpers
def infer_lengths(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Real length per prompt: trailing pad tokens are padding (position 0 always counts). [batch]"""
    batch, width = tokens.shape
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        return torch.full((batch,), width, dtype=torch.long)
    real = tokens != pad
    real[:, 0] = True
    idx = torch.arange(1, width + 1).expand(batch, width)
    return torch.where(real, idx, torch.zeros_like(idx)).max(dim=1).values


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> list:
    """values [prompt, ..., pos], mask [prompt, pos] -> nested list [..., pos] (None where no prompt)."""
    m = mask.to(values.dtype).reshape(mask.shape[0], *([1] * (values.ndim - 2)), mask.shape[1])
    count = m.sum(0)  # [1..., pos]
    mean = (values * m).sum(0) / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    return _nan_to_none(mean.tolist())


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if x != x else x


def _per_prompt(values: torch.Tensor, lengths: torch.Tensor) -> list:
    """values [prompt, ..., pos] -> per prompt, truncated to its length."""
    return [values[i, ..., : int(n)].tolist() for i, n in enumerate(lengths)]


def _real_mean(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """values [prompt, K, pos] -> [K] mean over every real token."""
    m = mask.to(values.dtype)[:, None, :]
    return ((values * m).sum((0, 2)) / m.sum((0, 2)).clamp_min(1)).tolist()


def bootstrap_ratio(num: torch.Tensor, den: torch.Tensor, *, n_bootstrap: int,
                    seed: int) -> tuple[float | None, float | None]:
    """Percentile 95% CI of sum(num)/sum(den) resampling the units (num, den [unit])."""
    n = num.shape[0]
    if n == 0 or n_bootstrap <= 0:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_bootstrap, n), generator=gen)  # [boot, unit]
    ratios = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return lo, hi


# ------------------------------------------------------------------------ frozen LN constants
class FrozenLN(BaseModel):
    """One LN of a released-format LN-free checkpoint: LN(x) = (x - mean) * gamma / sigma + beta."""

    site: Site
    layer: int | None
    name: str = Field(description="the Hugging Face module, e.g. transformer.h.0.ln_1")
    sigma: float | None = Field(description="the frozen sigma_avg (ln1: the Q/K path's), None if unknown")
    sigma_v: float | None = Field(default=None, description="ln1 only: the V path's sigma (folded into W_V)")
    gain_mean: float | None = Field(description="mean over d_model of weight / sqrt(eps) = gamma / sigma")
    gamma_mean: float | None = Field(description="gain_mean * sigma (None without sigma)")


def _locate(source: ModelSource, filename: str) -> Path | None:
    """A checkpoint file, locally or from the Hugging Face cache (never the network)."""
    if source.path is not None:
        p = Path(source.path) / filename
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.hub_id, filename, revision=source.revision)
    except Exception:  # noqa: BLE001 - a missing cache is not an error here
        return None
    return Path(found) if isinstance(found, (str, Path)) else None


_LN_KEY = re.compile(r"(?:^|\.)h\.(\d+)\.(ln_1|ln_2)\.weight$")
_LNF_KEY = re.compile(r"(?:^|\.)ln_f\.weight$")


def _ln_weights(source: ModelSource) -> dict[str, torch.Tensor]:
    """Raw LN weights {key: [d_model]} of a GPT-2-style checkpoint (safetensors, else torch .bin)."""
    wanted = lambda k: bool(_LN_KEY.search(k) or _LNF_KEY.search(k))  # noqa: E731
    files: list[Path] = []
    index = _locate(source, "model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [f for f in (_locate(source, s) for s in shards) if f is not None]
    elif (single := _locate(source, "model.safetensors")) is not None:
        files = [single]
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if wanted(k):
                        out[k] = fh.get_tensor(k)
        return out
    binary = _locate(source, "pytorch_model.bin")
    if binary is not None:
        state = torch.load(binary, map_location="cpu", weights_only=True)
        out = {k: v for k, v in state.items() if wanted(k)}
    return out


def frozen_ln_constants(source: ModelSource, n_layers: int) -> tuple[list[FrozenLN], list[str]]:
    """(one FrozenLN per ln_1, ln_2 of every layer and ln_f, notes). Robust: unknowns are None."""
    notes: list[str] = []
    sigmas: dict[str, float] = {}
    meta = _locate(source, METADATA_FILE)
    if meta is not None:
        try:
            data = json.loads(meta.read_text())
            raw = data.get("sigmas") or data.get("sigma") or {}
            sigmas = {str(k): float(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            notes.append(f"{METADATA_FILE} could not be read ({exc}); sigma unknown")
    else:
        notes.append(
            f"no {METADATA_FILE} with the checkpoint: sigma is unknown (the released format folds it into "
            "gamma / sigma); gain_mean = mean(gamma / sigma) is reported instead"
        )
    eps = 1e12
    config = _locate(source, "config.json")
    if config is not None:
        try:
            eps = float(json.loads(config.read_text()).get("layer_norm_epsilon", eps))
        except (ValueError, TypeError):
            pass
    try:
        weights = _ln_weights(source)
    except Exception as exc:  # noqa: BLE001 - report, do not fail the analysis
        weights = {}
        notes.append(f"LN weights could not be read from the checkpoint ({type(exc).__name__}: {exc})")
    if not weights and not any("could not be read" in n for n in notes):
        notes.append("no LN weights found in the checkpoint files: gain_mean unknown")
    by_site: dict[tuple[str, int | None], tuple[str, torch.Tensor]] = {}
    for key, w in weights.items():
        if (m := _LN_KEY.search(key)) is not None:
            by_site[("ln1" if m.group(2) == "ln_1" else "ln2", int(m.group(1)))] = (key.removesuffix(".weight"), w)
        elif _LNF_KEY.search(key):
            by_site[("ln_final", None)] = (key.removesuffix(".weight"), w)

    def entry(site: Site, layer: int | None, default_name: str, sigma_key: str,
              sigma_v_key: str | None = None) -> FrozenLN:
        name, w = by_site.get((site, layer), (default_name, None))
        gain = float(w.double().mean() / eps**0.5) if w is not None else None
        sigma = sigmas.get(sigma_key)
        if sigma is None and site == "ln1":
            sigma = sigmas.get(f"blocks.{layer}.ln_1")
        return FrozenLN(
            site=site, layer=layer, name=name, sigma=sigma,
            sigma_v=sigmas.get(sigma_v_key) if sigma_v_key else None,
            gain_mean=gain, gamma_mean=gain * sigma if gain is not None and sigma is not None else None,
        )

    out = []
    for layer in range(n_layers):
        out.append(entry("ln1", layer, f"transformer.h.{layer}.ln_1", f"blocks.{layer}.ln_1_qk",
                         f"blocks.{layer}.ln_1_v"))
        out.append(entry("ln2", layer, f"transformer.h.{layer}.ln_2", f"blocks.{layer}.ln_2"))
    out.append(entry("ln_final", None, "transformer.ln_f", "ln_f"))
    return out, notes


# ------------------------------------------------------------------------------------ ln_stats
class LNStatsModelResult(BaseModel):
    role: str
    has_ln: bool
    notes: list[str] = Field(default_factory=list)
    n_prompts: int
    n_layers: int
    lengths: list[int] = Field(description="[prompt] real tokens per prompt")
    ln1_scale_mean: list[list[float | None]] | None = Field(description="[layer][pos] mean over prompts")
    ln2_scale_mean: list[list[float | None]] | None = Field(description="[layer][pos] mean over prompts")
    ln_final_scale_mean: list[float | None] | None = Field(description="[pos] mean over prompts")
    ln1_scale: list[list[list[float]]] | None = Field(description="[prompt][layer][pos]")
    ln2_scale: list[list[list[float]]] | None = Field(description="[prompt][layer][pos]")
    ln_final_scale: list[list[float]] | None = Field(description="[prompt][pos]")
    scale_layer_mean: dict[str, list[float]] | None = Field(
        description="site -> [layer] mean scale over every real token (ln_final: one value)"
    )
    frozen: list[FrozenLN] | None = Field(description="LN-free: the constants of each removed LN")
    resid_norm_mean: list[list[float | None]] = Field(
        description="[layer + 1][pos] ||resid_pre|| of each layer then the final residual, mean over prompts"
    )
    resid_norm: list[list[list[float]]] | None = Field(description="[prompt][layer + 1][pos]")
    resid_norm_layer_mean: list[float] = Field(description="[layer + 1] mean over every real token")


class LNLayerRow(BaseModel):
    """One LN across the trio: the mean scale of a model with LN, the frozen sigma of the LN-free one."""

    site: Site
    layer: int | None
    values: dict[str, float | None]
    kinds: dict[str, str] = Field(description="role -> 'mean_scale' or 'frozen_sigma'")


class LNStatsResult(BaseModel):
    manifest: Manifest
    roles: dict[str, LNStatsModelResult]
    layer_table: list[LNLayerRow]


@torch.no_grad()
def ln_stats(
    model: LoadedModel,
    tokens: torch.Tensor,
    *,
    lengths: Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 8,
    per_prompt: bool = True,
    progress: Progress | None = None,
) -> LNStatsModelResult:
    """LN scales per token and layer (or the LN-free model's frozen constants) and residual norms.

    tokens [batch, pos], right-padded; `lengths` [batch] (default: trailing pad tokens are padding).
    """
    progress = ensure(progress)
    tokens = torch.as_tensor(tokens).long()
    if tokens.ndim == 1:
        tokens = tokens[None]
    bridge, cfg = model.bridge, model.bridge.cfg
    n_prompts, width = tokens.shape
    n_layers = cfg.n_layers
    lengths_t = infer_lengths(tokens, model.tokenizer) if lengths is None else torch.as_tensor(lengths).long()
    mask = torch.arange(width)[None, :] < lengths_t[:, None]  # [prompt, pos]
    has_ln = "ln_final.hook_scale" in bridge.hook_dict
    resid_names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    scale_names = {
        "ln1": [f"blocks.{l}.ln1.hook_scale" for l in range(n_layers)],
        "ln2": [f"blocks.{l}.ln2.hook_scale" for l in range(n_layers)],
        "ln_final": ["ln_final.hook_scale"],
    } if has_ln else {}
    wanted = set(resid_names) | {n for names in scale_names.values() for n in names}

    norms, scales = [], {site: [] for site in scale_names}
    n_batches = (n_prompts + batch_size - 1) // batch_size
    for bi, start in enumerate(range(0, n_prompts, batch_size)):
        progress.stage("ln stats: forward", bi / max(n_batches, 1))
        _, cache = bridge.run_with_cache(tokens[start : start + batch_size].to(model.device),
                                         names_filter=lambda n: n in wanted)
        # [b, layer + 1, pos]
        norms.append(torch.stack([cache[n].double().norm(dim=-1) for n in resid_names], dim=1).cpu())
        for site, names in scale_names.items():
            scales[site].append(torch.stack([cache[n].double()[..., 0] for n in names], dim=1).cpu())  # [b, K, pos]
        del cache
    progress.stage("ln stats: forward", 1.0)

    norm = torch.cat(norms)  # [prompt, layer + 1, pos]
    fields: dict[str, Any] = {f"{s}_scale{suffix}": None
                              for s in ("ln1", "ln2", "ln_final") for suffix in ("", "_mean")}
    notes: list[str] = []
    frozen = None
    scale_layer_mean = None
    if has_ln:
        scale_layer_mean = {}
        for site, parts in scales.items():
            s = torch.cat(parts)  # [prompt, K, pos]
            if site == "ln_final":
                fields["ln_final_scale_mean"] = _masked_mean(s[:, 0], mask)
                fields["ln_final_scale"] = _per_prompt(s[:, 0], lengths_t) if per_prompt else None
            else:
                fields[f"{site}_scale_mean"] = _masked_mean(s, mask)
                fields[f"{site}_scale"] = _per_prompt(s, lengths_t) if per_prompt else None
            scale_layer_mean[site] = _real_mean(s, mask)
    else:
        progress.stage("ln stats: frozen constants", 0.0)
        frozen, notes = frozen_ln_constants(model.source, n_layers)
        notes.insert(0, "LN-free: no normalization, so no scales; `frozen` lists the constants it carries")

    return LNStatsModelResult(
        role=model.role,
        has_ln=has_ln,
        notes=notes,
        n_prompts=n_prompts,
        n_layers=n_layers,
        lengths=lengths_t.tolist(),
        scale_layer_mean=scale_layer_mean,
        frozen=frozen,
        resid_norm_mean=_masked_mean(norm, mask),
        resid_norm=_per_prompt(norm, lengths_t) if per_prompt else None,
        resid_norm_layer_mean=_real_mean(norm, mask),
        **fields,
    )




def ln_layer_table(per_role: Mapping[str, LNStatsModelResult]) -> list[LNLayerRow]:
    """Per LN site and layer: each role's mean scale (with LN) or frozen sigma (LN-free)."""
    n_layers = max(r.n_layers for r in per_role.values())
    rows = []
    for site, layer in [(s, l) for l in range(n_layers) for s in ("ln1", "ln2")] + [("ln_final", None)]:
        values: dict[str, float | None] = {}
        kinds: dict[str, str] = {}
        for role, r in per_role.items():
            if r.has_ln and r.scale_layer_mean is not None:
                v = r.scale_layer_mean[site]
                values[role] = v[0 if layer is None else layer] if (layer or 0) < len(v) else None
                kinds[role] = "mean_scale"
            else:
                hit = [f for f in (r.frozen or []) if f.site == site and f.layer == layer]
                values[role] = hit[0].sigma if hit else None
                kinds[role] = "frozen_sigma"
        rows.append(LNLayerRow(site=site, layer=layer, values=values, kinds=kinds))
    return rows


# ---------------------------------------------------------------------------------------- loss
def text_sequences(tokenizer, texts: Sequence[str], context: int, max_tokens: int | None = None) -> list[list[int]]:
    """Each text -> BOS + chunks of (context - 1) tokens (context without a BOS), >= 2 tokens each.

    `max_tokens` caps the number of predicted tokens (sum over sequences of len - 1).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    step = context - 1 if bos is not None else context
    if step < 1:
        raise ValueError(f"context {context} is too short")
    out: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        for start in range(0, len(ids), step):
            seq = ([bos] if bos is not None else []) + ids[start : start + step]
            if len(seq) < 2:
                continue
            if len(seq) - 1 > budget:
                seq = seq[: int(budget) + 1]
            if len(seq) >= 2:
                out.append(seq)
                budget -= len(seq) - 1
            if budget <= 0:
                return out
    return out


class LossModelResult(BaseModel):
    role: str
    context: int
    n_sequences: int
    n_tokens: int = Field(description="predicted tokens (each sequence contributes len - 1)")
    mean_loss: float | None = Field(description="nats per predicted token")
    ci_low: float | None
    ci_high: float | None
    n_bootstrap: int
    seed: int
    per_sequence_mean: list[float]
    per_position_mean: list[float | None] = Field(description="[pos] mean over sequences (pos predicts pos + 1)")
    token_losses: list[list[float]] | None = Field(description="[sequence][token] per predicted token")


class CERow(BaseModel):
    role: str
    ce: float | None
    ci_low: float | None
    ci_high: float | None
    gap_vs_original: float | None = Field(description="ce - ce(original)")
    n_tokens: int


class LossResult(BaseModel):
    manifest: Manifest
    roles: dict[str, LossModelResult]
    table: list[CERow] = Field(description="paper layout: original, control, ln_free")


def _token_losses(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """-log softmax(logits)[target] in float64, chunked over positions: logits [pos, vocab] -> [pos]."""
    out = []
    for s in range(0, logits.shape[0], chunk):
        lp = logits[s : s + chunk].double()
        out.append(torch.logsumexp(lp, -1) - lp.gather(-1, targets[s : s + chunk, None].to(lp.device))[:, 0])
    return torch.cat(out).cpu()


@torch.no_grad()
def loss(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int | None = None,
    context: int | None = None,
    batch_size: int = 4,
    n_bootstrap: int = 1000,
    seed: int = 0,
    per_token: bool = True,
    progress: Progress | None = None,
) -> LossModelResult:
    """Held-out cross-entropy of `model` on `texts` (mean and per token; bootstrap CI over sequences)."""
    progress = ensure(progress)
    bridge = model.bridge
    context = min(context or bridge.cfg.n_ctx, bridge.cfg.n_ctx)
    seqs = text_sequences(model.tokenizer, texts, context, max_tokens)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    losses: list[torch.Tensor] = []  # per sequence [len - 1]
    n_batches = (len(seqs) + batch_size - 1) // batch_size
    for bi, start in enumerate(range(0, len(seqs), batch_size)):
        progress.stage("loss: forward", bi / max(n_batches, 1))
        batch = seqs[start : start + batch_size]
        width = max(len(s) for s in batch)
        toks = torch.full((len(batch), width), pad, dtype=torch.long)  # right-padded: causal, never read
        for i, s in enumerate(batch):
            toks[i, : len(s)] = torch.tensor(s)
        logits = bridge(toks.to(model.device))  # [b, pos, vocab]
        for i, s in enumerate(batch):
            n = len(s) - 1
            losses.append(_token_losses(logits[i, :n], toks[i, 1 : n + 1]))
        del logits
    progress.stage("loss: forward", 1.0)

    sums = torch.tensor([float(l.sum()) for l in losses], dtype=torch.float64)  # [seq]
    counts = torch.tensor([l.numel() for l in losses], dtype=torch.float64)  # [seq]
    n_tokens = int(counts.sum())
    mean = float(torch.cat(losses).mean()) if n_tokens else None
    lo, hi = bootstrap_ratio(sums, counts, n_bootstrap=n_bootstrap, seed=seed)
    width = max((l.numel() for l in losses), default=0)
    per_pos: list[float | None] = []
    if width:
        padded = torch.zeros(len(losses), width, dtype=torch.float64)
        present = torch.zeros(len(losses), width, dtype=torch.bool)
        for i, l in enumerate(losses):
            padded[i, : l.numel()], present[i, : l.numel()] = l, True
        per_pos = _masked_mean(padded, present)
    return LossModelResult(
        role=model.role,
        context=context,
        n_sequences=len(seqs),
        n_tokens=n_tokens,
        mean_loss=mean,
        ci_low=lo,
        ci_high=hi,
        n_bootstrap=n_bootstrap,
        seed=seed,
        per_sequence_mean=(sums / counts.clamp_min(1)).tolist(),
        per_position_mean=per_pos,
        token_losses=[l.tolist() for l in losses] if per_token else None,
    )


def ce_table(per_role: Mapping[str, LossModelResult]) -> list[CERow]:
    """The paper's CE table: each role's mean loss and CI, and its gap to `original`."""
    base = per_role["original"].mean_loss if "original" in per_role else None
    return [
        CERow(role=role, ce=r.mean_loss, ci_low=r.ci_low, ci_high=r.ci_high, n_tokens=r.n_tokens,
              gap_vs_original=(r.mean_loss - base) if base is not None and r.mean_loss is not None else None)
        for role, r in per_role.items()
    ]
