"""Exactness checks for a loaded trio (what `lnscope check-pair` prints).

- max_rel_logit_error: max over prompts, positions and vocabulary of
  |logp_bridge - logp_hf| / max(|logp_hf|, 1), against the plain Hugging Face model. Log-probs,
  because centring the unembedding shifts every logit at a position by the same constant.
- dla_sum_rel_error: max |sum_c (c @ W_U) + b_U - logits| / max |logits|, the components c
  being the embeddings, every head's output, every attention output bias and every MLP
  output. Exact for an LN-free model; for a model with LN the final LN scale is frozen at its
  cached value (each component is centred and divided by it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, Field
from transformer_lens.ActivationCache import ActivationCache

from lnscope.analysis.device import dtype_name
from lnscope.analysis.loading import LoadedModel, load_hf_model, load_model
from lnscope.analysis.pairs import ModelSource, Role

CHECK_PROMPTS: tuple[str, ...] = (
    "When Mary and John went to the store, John gave a drink to",
    "The war lasted from the year 1732 to the year 17",
    "The capital of France is Paris, and the capital of Italy is",
    "Once upon a time, a little dog found a red ball in the garden. The dog",
    "1 2 3 4 5 6 7 8",
)


def tokenize_prompts(tokenizer, prompts: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + prompt, right-padded: (tokens [batch, pos], lengths [batch]).

    Causal attention means the padding never reaches a real position, so no mask is needed.
    """
    bos = tokenizer.bos_token_id
    rows = [([bos] if bos is not None else []) + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    rows = [r[:n_ctx] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos or 0)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) for r in rows])


def _valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """mask [batch, pos]: True on real (non-padding) positions."""
    return torch.arange(width)[None, :] < lengths[:, None]


def log_prob_rel_error(log_probs: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor) -> float:
    """max |lp - lp_ref| / max(|lp_ref|, 1) over real positions; inputs [batch, pos, vocab]."""
    mask = _valid(lengths, log_probs.shape[1])
    err = (log_probs - reference).abs() / reference.abs().clamp_min(1.0)
    return float(err[mask].max())


def residual_components(loaded: LoadedModel, cache: ActivationCache) -> tuple[torch.Tensor, list[str]]:
    """Everything written to the final residual stream: ([component, batch, pos, d_model], labels).

    embed, pos_embed, every head (L{l}H{h}), each layer's attention output bias (L{l}b_O) and
    each MLP output (L{l}MLP). Their sum is the final residual stream.
    """
    bridge = loaded.bridge
    embed = cache["hook_embed"]
    heads, head_labels = cache.stack_head_results(layer=-1, return_labels=True)
    parts = [embed, cache["hook_pos_embed"]]
    labels = ["embed", "pos_embed"]
    for layer in range(bridge.cfg.n_layers):
        n = bridge.cfg.n_heads
        parts.extend(heads[layer * n : (layer + 1) * n])
        labels.extend(head_labels[layer * n : (layer + 1) * n])
        parts.append(bridge.blocks[layer].attn.b_O.to(embed.dtype).expand_as(embed))
        labels.append(f"L{layer}b_O")
        parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
        labels.append(f"L{layer}MLP")
    return torch.stack(parts), labels


@torch.no_grad()
def dla_sum_rel_error(loaded: LoadedModel, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> float:
    """max |sum of component DLAs + b_U - logits| / max |logits| (frozen LN scale if any)."""
    bridge = loaded.bridge
    tokens = tokens.to(loaded.device)
    logits, cache = bridge.run_with_cache(tokens)
    components, _ = residual_components(loaded, cache)
    if "ln_final.hook_scale" in cache:  # a model with LN: freeze the final scale
        components = (components - components.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"]
    recon = components.sum(0) @ bridge.W_U + bridge.b_U
    if lengths is None:
        lengths = torch.full((tokens.shape[0],), tokens.shape[1])
    mask = _valid(lengths, tokens.shape[1]).to(logits.device)
    return float((recon - logits).abs()[mask].max() / logits[mask].abs().max())


class RoleCheck(BaseModel):
    role: str
    source: str
    device: str
    dtype: str
    load_seconds: float = Field(description="wall time of the bridge load (download excluded if cached)")
    ln_treatment: str
    hook_scale_hooks: int = Field(description="number of LN scale hooks left (0 for ln_free)")
    max_rel_logit_error: float
    dla_sum_rel_error: float
    dla_final_scale: str = Field(description="'none' (LN-free, exact) or 'frozen' (cached ln_final scale)")


class PairCheck(BaseModel):
    pair: str
    prompts: list[str]
    roles: list[RoleCheck]


@torch.no_grad()
def check_model(
    source: ModelSource,
    role: Role,
    *,
    device=None,
    dtype=None,
    prompts: Sequence[str] = CHECK_PROMPTS,
    loaded: LoadedModel | None = None,
) -> RoleCheck:
    """Load one model (unless given) and measure its exactness against Hugging Face."""
    if loaded is None:
        loaded = load_model(source, role, device=device, dtype=dtype)
    bridge = loaded.bridge
    tokens, lengths = tokenize_prompts(loaded.tokenizer, prompts, bridge.cfg.n_ctx)
    reference = load_hf_model(source, role, loaded.dtype).to(loaded.device)
    ref_lp = reference(tokens.to(loaded.device)).logits.log_softmax(-1).cpu()
    del reference
    lp = bridge(tokens.to(loaded.device)).log_softmax(-1).cpu()
    return RoleCheck(
        role=role,
        source=source.describe(),
        device=str(loaded.device),
        dtype=dtype_name(loaded.dtype),
        load_seconds=round(loaded.load_seconds, 3),
        ln_treatment=loaded.ln_treatment,
        hook_scale_hooks=sum(name.endswith("hook_scale") for name in bridge.hook_dict),
        max_rel_logit_error=log_prob_rel_error(lp, ref_lp, lengths),
        dla_sum_rel_error=dla_sum_rel_error(loaded, tokens, lengths),
        dla_final_scale="none" if loaded.ln_treatment == "removed" else "frozen",
    )


def check_pair(
    name: str,
    sources: dict[str, ModelSource],
    *,
    device=None,
    dtype=None,
    prompts: Sequence[str] = CHECK_PROMPTS,
) -> PairCheck:
    """check_model for every role of a trio, on one device."""
    results = [check_model(src, role, device=device, dtype=dtype, prompts=prompts) for role, src in sources.items()]
    return PairCheck(pair=name, prompts=list(prompts), roles=results)
