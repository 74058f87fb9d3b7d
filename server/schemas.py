"""Response bodies of the API (pydantic v2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: str = Field(description="device the models of every pair run on", examples=["cpu"])


class RoleInfo(BaseModel):
    role: str = Field(examples=["ln_free"])
    hub_id: str | None = Field(default=None, examples=["schaeff/gpt2-small_LNFree300"])
    revision: str | None = None
    path: str | None = None
    available_locally: bool = Field(description="a local directory that exists, or a Hub id already in the cache")
    loaded: bool
    state: Literal["not_loaded", "loading", "loaded", "error"]
    error: str | None = None


class PairInfo(BaseModel):
    name: str = Field(examples=["tiny"])
    description: str
    builtin: bool
    default: bool
    roles: list[RoleInfo]


class ModelsResponse(BaseModel):
    default_pair: str
    device: str
    dtype: str
    pairs: list[PairInfo]


class ErrorBody(BaseModel):
    detail: str
