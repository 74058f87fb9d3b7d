"""The local replacement model of one prompt (circuit-tracer's ReplacementModel, run through the bridge's hooks).

Every MLP is replaced by its transcoder plus a frozen error term, and the attention patterns and
LayerNorm scales are frozen at their values on the prompt, so that the residual stream is an affine
function of the node outputs. Per layer l, on the prompt:

    mlp_out_l = node_out_l + const_out_l + skip_l(x_l),   node_out_l = sum_f a_f W_dec[f] + error_l

where x_l is what the MLP receives (`blocks.{l}.mlp.hook_in`), const_out_l = b_dec (plus, with
bos="bias", position 0's whole MLP output) and error_l = mlp_out_l - reconstruction - const - skip
(a layer without a transcoder is all error). The skip term is recomputed from the live x_l, so that
gradients flow through it as through the model. `bos` says what position 0's MLP outputs are:
"bias" constants (circuit-tracer), "error" nodes (no features there), "features" like any position.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.transcoders.model import TranscoderSet

BosMode = Literal["bias", "error", "features"]


def prompt_tokens(model: LoadedModel, prompt: str | Sequence[int] | torch.Tensor, *,
                  prepend_bos: bool = True) -> list[int]:
    """BOS + the prompt's tokens (as analysis.checks.tokenize_prompts), or the given ids."""
    if isinstance(prompt, str):
        bos = model.tokenizer.bos_token_id
        text_ids = list(model.tokenizer.encode(prompt, add_special_tokens=False))
        ids = ([bos] if prepend_bos and bos is not None else []) + text_ids
    else:
        ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    n_ctx = int(model.bridge.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context {n_ctx}")
    if not ids:
        raise ValueError("empty prompt")
    return ids


def decode_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id as its own string."""
    return [tokenizer.decode([int(t)]) for t in ids]


def hook_names(bridge) -> dict[str, list[str]]:
    """The hooks the replacement model reads or overrides, by role."""
    names = bridge.hook_dict
    L = int(bridge.cfg.n_layers)
    return {
        "freeze": [n for n in names if n.endswith(".hook_pattern") or n.endswith(".hook_scale")],
        "mlp_in": [f"blocks.{l}.mlp.hook_in" for l in range(L)],
        "mlp_out": [f"blocks.{l}.hook_mlp_out" for l in range(L)],
        "embed": ["hook_embed"],
    }


@dataclass
class FrozenPrompt:
    """The clean run of one prompt, split into what the replacement model freezes and its node outputs."""

    tokens: torch.Tensor  # [1, pos]
    logits: torch.Tensor  # [pos, vocab] clean
    frozen: dict[str, torch.Tensor]  # hook name -> [1, ...] attention pattern / LayerNorm scale
    mlp_in: list[torch.Tensor]  # per layer [pos, d_model]: x_l
    node_out: list[torch.Tensor]  # per layer [pos, d_model]: features + error (what the leaf carries)
    const_out: list[torch.Tensor]  # per layer [pos, d_model]: b_dec (+ position 0's MLP output with bos="bias")
    error: list[torch.Tensor]  # per layer [pos, d_model]: MLP output - reconstruction - const - skip
    embed: torch.Tensor  # [pos, d_model] token embeddings (`hook_embed`)
    active: torch.Tensor  # [n_active, 3] long: (layer, pos, feature) of each active feature
    values: torch.Tensor  # [n_active] activations a
    pre_acts: torch.Tensor  # [n_active] pre-activations (with bias)


@torch.no_grad()
def freeze_prompt(model: LoadedModel, transcoders: TranscoderSet, ids: list[int], bos: BosMode) -> FrozenPrompt:
    """Run `ids` once and split every MLP output into transcoder features, error and constants."""
    bridge = model.bridge
    names = hook_names(bridge)
    wanted = set(names["freeze"] + names["mlp_in"] + names["mlp_out"] + names["embed"])
    tokens = torch.tensor([ids], device=model.device)
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    L = int(bridge.cfg.n_layers)
    dtype = logits.dtype
    mlp_in, node_out, const_out, error = [], [], [], []
    active, values, pres = [], [], []
    for l in range(L):
        x = cache[f"blocks.{l}.mlp.hook_in"][0]
        out = cache[f"blocks.{l}.hook_mlp_out"][0]
        mlp_in.append(x)
        const = torch.zeros_like(out)
        if l in transcoders:
            tc = transcoders[l]
            pre = tc.pre_acts(x).to(dtype)
            z = tc.activate(pre)
            if bos != "features":
                z[0] = 0
            recon = z @ tc.W_dec.to(dtype)
            const = const + tc.b_dec.to(dtype)
            skip = tc.skip_term(x).to(dtype) if tc.has_skip else torch.zeros_like(out)
            err = out - recon - const - skip
            nz = z.nonzero()
            active.append(torch.cat([torch.full((nz.shape[0], 1), l, device=nz.device), nz], 1))
            values.append(z[nz[:, 0], nz[:, 1]])
            pres.append(pre[nz[:, 0], nz[:, 1]])
        else:
            recon, err, skip = torch.zeros_like(out), out.clone(), torch.zeros_like(out)
        if bos == "bias":  # position 0's MLP output is a constant, not a node (circuit-tracer)
            const[0] = out[0] - skip[0]
            err[0] = 0
        node_out.append(recon + err)
        const_out.append(const)
        error.append(err)
    frozen = {n: cache[n] for n in names["freeze"]}
    empty = torch.zeros((0, 3), dtype=torch.long, device=model.device)
    act = torch.cat(active) if active else empty
    return FrozenPrompt(tokens=tokens, logits=logits[0], frozen=frozen, mlp_in=mlp_in, node_out=node_out,
                        const_out=const_out, error=error, embed=cache["hook_embed"][0],
                        active=act.long(), values=torch.cat(values) if values else torch.zeros(0, dtype=dtype),
                        pre_acts=torch.cat(pres) if pres else torch.zeros(0, dtype=dtype))


@dataclass
class ReplacementRun:
    """One forward of the replacement model on `batch` copies of the prompt."""

    leaves: dict[str, torch.Tensor]  # "embed", "mlp{l}" -> [batch, pos, d_model] node outputs (grad leaves)
    live: dict[int, torch.Tensor]  # layer -> [batch, pos, d_model] x_l as the replacement model computes it
    logits_last: torch.Tensor  # [batch, vocab] at the last position


class ReplacementModel:
    """Runs the frozen replacement model of a prompt through the bridge's hooks.

    `hook_pattern` / `hook_scale` take their frozen values, `hook_embed` and each `hook_mlp_out` take
    leaf tensors carrying the node outputs (plus the constants and the live skip term), so that the
    gradient of a target with respect to a leaf is its derivative with respect to that node output.
    """

    def __init__(self, model: LoadedModel, transcoders: TranscoderSet, prompt: FrozenPrompt) -> None:
        self.model, self.transcoders, self.prompt = model, transcoders, prompt
        self.names = hook_names(model.bridge)

    def run(self, batch: int, *, zero_nodes: bool = False) -> ReplacementRun:
        """One forward of `batch` copies; `zero_nodes`: every node output 0 (leaves absent), the bias pass."""
        prompt, tcs = self.prompt, self.transcoders
        leaves: dict[str, torch.Tensor] = {}
        live: dict[int, torch.Tensor] = {}

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t[None].expand(batch, *t.shape)

        def freeze(t, hook):
            return expand(prompt.frozen[hook.name]).detach()

        def embed(t, hook):
            if zero_nodes:
                return torch.zeros_like(t)
            leaf = expand(prompt.embed).clone().requires_grad_(True)
            leaves["embed"] = leaf
            return leaf

        def mlp_in(t, hook):
            live[int(hook.name.split(".")[1])] = t
            return t[:1].detach()  # the MLP's output is discarded (mlp_out): compute it once, without a graph

        def mlp_out(t, hook):
            l = int(hook.name.split(".")[1])
            value = expand(prompt.const_out[l])
            if not zero_nodes:
                leaf = expand(prompt.node_out[l]).clone().requires_grad_(True)
                leaves[f"mlp{l}"] = leaf
                value = value + leaf
            if l in tcs and tcs[l].has_skip:
                value = value + tcs[l].skip_term(live[l]).to(t.dtype)
            return value

        hooks = [(n, freeze) for n in self.names["freeze"]] + [("hook_embed", embed)]
        hooks += [(n, mlp_in) for n in self.names["mlp_in"]] + [(n, mlp_out) for n in self.names["mlp_out"]]
        toks = prompt.tokens.expand(batch, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = self.model.bridge.run_with_hooks(toks, fwd_hooks=hooks)
        return ReplacementRun(leaves, live, logits[:, -1])
