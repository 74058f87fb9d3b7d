"""What a request will cost, estimated before it is queued: forward passes and graph memory.

A forward pass here is one prompt through the whole model (a batch of B prompts counts B); partial
runs (later layers only) count as whole ones, so estimates err on the high side. The server refuses
a request whose estimate exceeds its budgets, with both numbers in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lnscope.analysis.kinds.base import Inputs

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class ModelShape:
    """The sizes a cost depends on, read from a model's config (no weights)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    n_ctx: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        d_model = int(getattr(config, "n_embd", None) or config.hidden_size)
        return cls(n_layers=int(getattr(config, "n_layer", None) or config.num_hidden_layers),
                   n_heads=int(getattr(config, "n_head", None) or config.num_attention_heads),
                   d_model=d_model, d_mlp=int(getattr(config, "n_inner", None) or 4 * d_model),
                   n_ctx=int(getattr(config, "n_positions", None) or config.max_position_embeddings))


@dataclass(frozen=True)
class Cost:
    """Estimated work per role: whole-model forward passes (backward passes count as two) and the bytes
    of the largest dense graph held at once."""

    forward_passes: int
    graph_bytes: int = 0


def n_prompts(inputs: Inputs) -> int:
    """Rows the units run on: prompts, task prompts or text chunks."""
    for tokens in (inputs.extra.get("tokens"), inputs.tokens, getattr(inputs.task, "clean_tokens", None)):
        if tokens is not None:
            return int(tokens.shape[0])
    return len(inputs.texts or [])


def n_positions(inputs: Inputs) -> int:
    for tokens in (inputs.extra.get("tokens"), inputs.tokens, getattr(inputs.task, "clean_tokens", None)):
        if tokens is not None:
            return int(tokens.shape[1])
    return 1


def patched_nodes(nodes: list[str], shape: ModelShape, n_pos: int) -> int:
    """How many nodes an activation-patching sweep patches (each patched separately)."""
    from lnscope.analysis.patching.nodes import NODE_TYPES

    sizes = {"pos": n_pos, "head": shape.n_heads, "neuron": shape.d_mlp}
    return sum(shape.n_layers * math.prod(sizes[a] for a in NODE_TYPES[n].axes) for n in dict.fromkeys(nodes))


def activation_patching_passes(nodes: list[str], chunk_size: int | None, shape: ModelShape, inputs: Inputs) -> int:
    """Clean and corrupt runs, then one pass per chunk of patched nodes, per prompt."""
    chunk = chunk_size or 8  # the CPU default: the smaller one, so the larger estimate
    return n_prompts(inputs) * (2 + math.ceil(patched_nodes(nodes, shape, n_positions(inputs)) / chunk))


def attribution_graph_bytes(max_feature_nodes: int, max_n_logits: int, shape: ModelShape, n_pos: int) -> int:
    """The dense adjacency of an attribution graph: feature, error, token and logit nodes squared, float32."""
    n_nodes = max_feature_nodes + shape.n_layers * n_pos + n_pos + max_n_logits
    return FLOAT32_BYTES * n_nodes * n_nodes


def cost_dla(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=n_prompts(inputs))


def cost_ln_stats(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=n_prompts(inputs))


def cost_loss(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=math.ceil(options.max_tokens / max(shape.n_ctx - 1, 1)))


def cost_confidence(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    """A clean pass, a mean-activation pass and, with `propagate`, one pass per candidate neuron."""
    candidates = len(options.candidates) if options.candidates else options.top_n
    per_row = 2 + (candidates if options.propagate else 0)
    return Cost(forward_passes=n_prompts(inputs) * per_row)


def cost_atp(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=4 * n_prompts(inputs))  # clean and corrupt forwards, a backward (two)


def cost_act_patch(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=activation_patching_passes(options.nodes, options.chunk_size, shape, inputs))


def cost_fidelity(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=activation_patching_passes(options.nodes, options.chunk_size, shape, inputs)
                + 4 * n_prompts(inputs))


def cost_circuit(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    """One forward and backward per computed feature row (batched, counted whole), and the dense graph."""
    n_pos = n_positions(inputs)
    rows = options.max_feature_nodes + shape.n_layers * n_pos + options.max_n_logits
    return Cost(forward_passes=2 * rows, graph_bytes=attribution_graph_bytes(
        options.max_feature_nodes, options.max_n_logits, shape, n_pos))


def cost_circuit_diff(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    """As a circuit, with both roles' graphs held until they are matched."""
    one = cost_circuit(options, inputs, shape)
    return Cost(forward_passes=one.forward_passes, graph_bytes=2 * one.graph_bytes)


def cost_feature(options: Any, inputs: Inputs, shape: ModelShape) -> Cost:
    return Cost(forward_passes=1 + (options.n_contexts or 0))


def check_budget(cost: Cost, n_roles: int, max_forward_passes: int | None, max_graph_bytes: int | None) -> None:
    """RequestError when the request's estimated work (every role) exceeds a budget, with both numbers."""
    from lnscope.analysis.kinds.base import RequestError

    passes = cost.forward_passes * n_roles
    if max_forward_passes is not None and passes > max_forward_passes:
        raise RequestError(["body"], f"this request needs about {passes:,} forward passes ({cost.forward_passes:,} "
                           f"per role x {n_roles} roles); the server's limit is {max_forward_passes:,} "
                           "(LNSCOPE_MAX_FORWARD_PASSES): use fewer prompts, node types or features")
    if max_graph_bytes is not None and cost.graph_bytes > max_graph_bytes:
        raise RequestError(["body", "options", "max_feature_nodes"],
                           f"this graph needs about {cost.graph_bytes / 2**20:,.0f} MiB; the server's limit is "
                           f"{max_graph_bytes / 2**20:,.0f} MiB (LNSCOPE_MAX_GRAPH_BYTES): use fewer feature nodes "
                           "or a shorter prompt")
