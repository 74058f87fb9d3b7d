"""Where models run: CUDA, then MPS, then CPU, overridable with LNSCOPE_DEVICE / LNSCOPE_DTYPE."""

from __future__ import annotations

import os

import torch

from lnscope.analysis.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: `requested`, else $LNSCOPE_DEVICE, else cuda > mps > cpu."""
    name = str(requested) if requested is not None else os.environ.get("LNSCOPE_DEVICE", "auto")
    name = name.strip().lower() or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"LNSCOPE_DEVICE / device: {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for, but MPS is not available here")
    return device


def resolve_dtype(requested: str | torch.dtype | None = None, device: torch.device | None = None) -> torch.dtype:
    """The dtype to load weights in: `requested`, else $LNSCOPE_DTYPE, else float32."""
    if isinstance(requested, torch.dtype):
        dtype = requested
    else:
        name = requested if requested is not None else os.environ.get("LNSCOPE_DTYPE", "float32")
        name = name.strip().lower().removeprefix("torch.")
        if name not in DTYPES:
            raise ConfigError(f"LNSCOPE_DTYPE / dtype: {name!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[name]
    if device is not None and device.type == "mps" and dtype == torch.float64:
        raise ConfigError("float64 is not supported on MPS; use float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
