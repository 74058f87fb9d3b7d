"""The transcoder module: a sparse, wide replacement for one MLP.

    pre = (x - b_in) W_enc^T + b_enc          W_enc [d_transcoder, d_model]
    z   = ReLU(pre)        (or TopK: keep the k largest of ReLU(pre))
    y   = z W_dec + b_dec (+ x W_skip^T)      W_dec [d_transcoder, d_model]

x is what the MLP receives (`blocks.{l}.mlp.hook_in`: the ln2 output, which in TransformerLens
compatibility mode is the centred, scale-normalised residual with gamma folded into W_in; for an
LN-free model it is the residual `hook_resid_mid` itself), y approximates the MLP output
(`blocks.{l}.hook_mlp_out`). `b_in` is Dunefsky's input centring ("b_dec" subtracted from the
input); it is folded into `b_enc` when saved in circuit-tracer's layout (b_enc - W_enc b_in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

Activation = Literal["relu", "topk"]


class Transcoder(nn.Module):
    """One layer's transcoder (see the module docstring for the maths)."""

    def __init__(self, d_model: int, d_transcoder: int, *, activation: Activation = "relu", k: int | None = None,
                 skip: bool = False, layer: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if activation not in ("relu", "topk"):
            raise ValueError(f"unknown activation {activation!r} (relu or topk)")
        if activation == "topk" and (k is None or k < 1):
            raise ValueError("a topk transcoder needs k >= 1")
        self.d_model, self.d_transcoder = int(d_model), int(d_transcoder)
        self.activation, self.k, self.layer = activation, (int(k) if k is not None else None), layer
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw))
        self.b_in = nn.Parameter(torch.zeros(d_model, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, **kw)) if skip else None

    # ------------------------------------------------------------------------------ properties
    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def effective_b_enc(self) -> torch.Tensor:
        """b_enc with the input centring folded in: pre = x W_enc^T + effective_b_enc."""
        return self.b_enc - self.W_enc @ self.b_in

    # ---------------------------------------------------------------------------------- maths
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return (x - self.b_in) @ self.W_enc.T + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        z = torch.relu(pre)
        if self.activation == "topk":
            k = min(self.k, z.shape[-1])
            vals, idx = z.topk(k, dim=-1)
            z = torch.zeros_like(z).scatter(-1, idx, vals)
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def skip_term(self, x: torch.Tensor) -> torch.Tensor:
        if self.W_skip is None:
            return torch.zeros((), dtype=self.W_dec.dtype, device=self.W_dec.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        y = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder needs its input to decode")
            y = y + self.skip_term(x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def forward_with_acts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z, x), z

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (the L1 penalty is then a plain sum of activations)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.activation == "topk" else ""
        return (f"layer={self.layer}, d_model={self.d_model}, d_transcoder={self.d_transcoder}, "
                f"activation={self.activation}{extra}, skip={self.has_skip}")


@dataclass
class TranscoderSet:
    """Transcoders of one model, by layer (a layer without one keeps its MLP: all error in graphs)."""

    transcoders: dict[int, Transcoder]
    d_model: int
    feature_input_hook: str = "mlp.hook_in"
    feature_output_hook: str = "hook_mlp_out"
    model_name: str | None = None
    scan: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # training options, metrics, source format

    def __post_init__(self) -> None:
        self.transcoders = {int(l): t for l, t in sorted(self.transcoders.items())}
        for layer, tc in self.transcoders.items():
            tc.layer = layer
            if tc.d_model != self.d_model:
                raise ValueError(f"layer {layer} transcoder has d_model {tc.d_model}, the set {self.d_model}")

    @property
    def layers(self) -> list[int]:
        return list(self.transcoders)

    @property
    def d_transcoder(self) -> int:
        return max(t.d_transcoder for t in self.transcoders.values())

    @property
    def activation(self) -> str:
        return next(iter(self.transcoders.values())).activation

    @property
    def skip(self) -> bool:
        return any(t.has_skip for t in self.transcoders.values())

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self.transcoders

    def __iter__(self) -> Iterator[int]:
        return iter(self.transcoders)

    def __len__(self) -> int:
        return len(self.transcoders)

    def to(self, device=None, dtype=None) -> "TranscoderSet":
        for tc in self.transcoders.values():
            tc.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "TranscoderSet":
        for tc in self.transcoders.values():
            tc.eval()
        return self

    def parameters(self):
        for tc in self.transcoders.values():
            yield from tc.parameters()

    def describe(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "d_model": self.d_model,
            "d_transcoder": self.d_transcoder,
            "activation": self.activation,
            "k": next(iter(self.transcoders.values())).k,
            "skip": self.skip,
            "feature_input_hook": self.feature_input_hook,
            "feature_output_hook": self.feature_output_hook,
            "model_name": _portable_name(self.model_name),
            "scan": self.scan,
        }


def random_transcoders(d_model: int, d_transcoder: int, layers, *, seed: int = 0, activation: Activation = "relu",
                       k: int | None = None, skip: bool = False, bias: float = 0.0,
                       dtype: torch.dtype = torch.float32) -> TranscoderSet:
    """Random transcoders (unit-norm decoder rows), for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        tc = Transcoder(d_model, d_transcoder, activation=activation, k=k, skip=skip, layer=layer, dtype=dtype)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d_transcoder, d_model, generator=gen) / d_model ** 0.5)
            tc.W_dec.copy_(torch.randn(d_transcoder, d_model, generator=gen))
            tc.b_enc.copy_(bias + 0.1 * torch.randn(d_transcoder, generator=gen))
            tc.b_dec.copy_(0.1 * torch.randn(d_model, generator=gen))
            tc.b_in.copy_(0.1 * torch.randn(d_model, generator=gen))
            if skip:
                tc.W_skip.copy_(0.1 * torch.randn(d_model, d_model, generator=gen) / d_model ** 0.5)
        tc.normalize_decoder()
        out[layer] = tc
    return TranscoderSet(out, d_model=d_model)


def _portable_name(model_name: str | None) -> str | None:
    """A Hub id as given; a local model path in the `models/...` form where it lies in the models directory."""
    from lnscope.analysis.pairs import portable_path

    return portable_path(model_name) if model_name and Path(model_name).is_absolute() else model_name
