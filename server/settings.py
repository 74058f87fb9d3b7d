"""Server settings, from the environment (LNSCOPE_*) and the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class Settings(BaseModel):
    host: str = Field(default="127.0.0.1", description="bind address; 127.0.0.1 unless shared on purpose")
    port: int = Field(default=8000, ge=1, le=65535)
    pair: str | None = Field(default=None, description="pair loaded at start-up (default: the registry's default)")
    device: str | None = Field(default=None, description="cuda / mps / cpu; default LNSCOPE_DEVICE or best")
    dtype: str | None = Field(default=None, description="float32 / float64 / bfloat16 / float16")
    preload: bool = Field(default=True, description="load the default pair in the background at start-up")
    data_dir: Path = Field(default=Path("data"), description="where the SQLite database lives")
    database_url: str | None = Field(default=None, description="any SQLAlchemy URL; default SQLite in data_dir")
    workers: int = Field(default=2, ge=1, le=64, description="job worker threads")
    max_queue: int = Field(default=64, ge=1, description="jobs waiting at most; more are refused with 503")
    job_timeout_s: float = Field(default=1800.0, gt=0, description="a job running longer is stopped")
    inline_wait_s: float = Field(default=30.0, ge=0, description="the longest ?wait=true holds a request")
    max_prompts: int = Field(default=64, ge=1, description="prompts (or task prompts) per request")
    max_prompt_tokens: int = Field(default=512, ge=1, description="tokens per prompt (also <= model context)")
    api_token: str | None = Field(default=None, description="bearer token required on every route but health")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins")
    allowed_hosts: list[str] | None = Field(
        default=None, description="Host headers answered (others get 400: no DNS rebinding); None: any. "
        "from_env defaults to the loopback names when the server binds to loopback")
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="request bodies larger are refused (413)")
    max_forward_passes: int | None = Field(
        default=100_000, ge=1, description="estimated whole-model forward passes a request may need, every role")
    max_graph_bytes: int | None = Field(default=2**30, ge=1, description="the largest attribution graph a request "
                                        "may hold (dense adjacency, bytes)")
    graph_memory_bytes: int | None = Field(default=4 * 2**30, ge=1, description="attribution graphs held by the "
                                           "jobs running at once, together")
    max_waiters: int = Field(default=256, ge=1, description="requests waiting inline (?wait=true) at once; more: 503")
    executor: Literal["local", "ray"] = Field(default="local", description="where analyses run: this process's "
                                              "threads, or one Ray model worker per (pair, role)")
    ray_address: str | None = Field(default=None, description="a running Ray cluster (ray://host:10001, or auto); "
                                    "unset: the server starts a local Ray instance")

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env_names = {
            "host": "LNSCOPE_HOST", "port": "LNSCOPE_PORT", "pair": "LNSCOPE_PAIR", "device": "LNSCOPE_DEVICE",
            "dtype": "LNSCOPE_DTYPE", "preload": "LNSCOPE_PRELOAD", "data_dir": "LNSCOPE_DATA_DIR",
            "database_url": "LNSCOPE_DATABASE_URL", "workers": "LNSCOPE_WORKERS", "max_queue": "LNSCOPE_MAX_QUEUE",
            "job_timeout_s": "LNSCOPE_JOB_TIMEOUT_S", "inline_wait_s": "LNSCOPE_INLINE_WAIT_S",
            "max_prompts": "LNSCOPE_MAX_PROMPTS", "max_prompt_tokens": "LNSCOPE_MAX_PROMPT_TOKENS",
            "api_token": "LNSCOPE_API_TOKEN", "cors_origins": "LNSCOPE_CORS_ORIGINS",
            "allowed_hosts": "LNSCOPE_ALLOWED_HOSTS", "max_body_bytes": "LNSCOPE_MAX_BODY_BYTES",
            "max_forward_passes": "LNSCOPE_MAX_FORWARD_PASSES", "max_graph_bytes": "LNSCOPE_MAX_GRAPH_BYTES",
            "graph_memory_bytes": "LNSCOPE_GRAPH_MEMORY_BYTES", "max_waiters": "LNSCOPE_MAX_WAITERS",
            "executor": "LNSCOPE_EXECUTOR", "ray_address": "LNSCOPE_RAY_ADDRESS",
        }
        values: dict = {k: os.environ[v] for k, v in env_names.items() if os.environ.get(v)}
        for key in ("cors_origins", "allowed_hosts"):
            if key in values:
                values[key] = [o.strip() for o in values[key].split(",") if o.strip()]
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.allowed_hosts is None and settings.host in LOOPBACK_HOSTS:
            settings.allowed_hosts = list(LOOPBACK_HOSTS)
        return settings
