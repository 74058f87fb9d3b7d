"""Server settings, from the environment (LNSCOPE_*) and the command line."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field


class Settings(BaseModel):
    host: str = Field(default="127.0.0.1", description="bind address; 127.0.0.1 unless shared on purpose")
    port: int = Field(default=8000, ge=1, le=65535)
    pair: str | None = Field(default=None, description="pair loaded at start-up (default: the registry's default)")
    device: str | None = Field(default=None, description="cuda / mps / cpu; default LNSCOPE_DEVICE or best")
    dtype: str | None = Field(default=None, description="float32 / float64 / bfloat16 / float16")
    preload: bool = Field(default=True, description="load the default pair in the background at start-up")

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = {
            "host": os.environ.get("LNSCOPE_HOST"),
            "port": os.environ.get("LNSCOPE_PORT"),
            "pair": os.environ.get("LNSCOPE_PAIR"),
            "device": os.environ.get("LNSCOPE_DEVICE"),
            "dtype": os.environ.get("LNSCOPE_DTYPE"),
            "preload": os.environ.get("LNSCOPE_PRELOAD"),
        }
        values = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
