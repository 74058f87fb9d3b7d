"""Response bodies of the API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lnscope.analysis.requests import AnalysisRequest, CustomPairIn, PromptText, Role, TaskSpec  # noqa: F401 (re-exported)
from lnscope.server.executors import WorkerInfo  # noqa: F401 (re-exported)


class Health(BaseModel):
    status: Literal["ok", "degraded"] = "ok"
    version: str
    device: str = Field(description="device the models of every pair run on", examples=["cpu"])
    database: dict[str, Any] = Field(default_factory=dict, description="writable, and why not (the last check)")
    workers: dict[str, Any] = Field(default_factory=dict, description="workers alive / expected, queue, waiters")


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


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body / query / path, then the field's path")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str | list[ValidationIssue] = Field(
        description="a message; for 422, the list of invalid fields, each with its location and message")


def _utc(value: datetime) -> datetime:
    """Datetimes are UTC; a naive one (as SQLite returns them) is marked so."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class JobInfo(BaseModel):
    id: str
    kind: str
    pair: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1)
    stage: str
    error: str | None = None
    error_kind: str | None = None
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    timings: dict[str, float | None]
    inputs: dict[str, Any] | None = Field(default=None, description="the request as stored: pair, roles, "
                                          "prompts / task / text, options")
    queue_position: int | None = Field(default=None, description="queued: 1 + the jobs before it that need one of "
                                       "its models (FIFO per model); None once it runs")
    links: dict[str, str]


class ResultOut(BaseModel):
    id: str
    kind: str
    pair: str
    status: str
    cached: bool = Field(default=False, description="true when an identical earlier request's result is returned")
    inputs: dict[str, Any]
    manifest: dict[str, Any] | None = Field(
        description="how the result was made: kind, pair, options, seed, one entry per role")
    timings: dict[str, float | None]
    result: dict[str, Any] | None


class ResultPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[JobInfo]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair: str = Field(default="tiny", min_length=1, max_length=128)
    text: PromptText
    prepend_bos: bool = True


class TokenOut(BaseModel):
    id: int
    text: str


class TokenizeResponse(BaseModel):
    pair: str
    n_tokens: int
    n_ctx: int
    tokens: list[TokenOut]


class KindInfo(BaseModel):
    name: str
    description: str
    inputs: str
    options_schema: dict[str, Any]


class WorkersResponse(BaseModel):
    executor: str = Field(description="local (this process's threads) or ray (a model worker per pair and role)")
    workers: list[WorkerInfo]
