"""The analysis kinds: each maps a validated request onto one analysis module call.

Nothing here computes: an adapter prepares plain inputs (tokens, a task batch, text) from the
request and hands them, with the loaded models, to the analysis module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.pairs import PairSpec
from lnscope.analysis.progress import Progress

from lnscope.analysis.requests import AnalysisRequest


class RequestError(LnscopeError, ValueError):
    """Invalid input found while preparing a request: answered with 422 naming the field."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message

    def __str__(self) -> str:
        field = ".".join(str(part) for part in self.loc if part != "body")
        return f"{field}: {self.message}" if field else self.message


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Inputs:
    """What an adapter hands to an analysis: exactly one of these is set, per the kind's needs."""

    tokens: torch.Tensor | None = None  # [batch, pos], BOS prepended, right-padded
    end_pos: torch.Tensor | None = None  # [batch]
    task: Any = None  # analysis.tasks TaskBatch
    texts: list[str] | None = None
    extra: dict[str, Any] | None = None  # what a kind's `prepare` derived (e.g. target token ids)


@dataclass(frozen=True)
class Limits:
    """Bounds on one request's inputs (the server's are configurable)."""

    max_prompts: int = 64
    max_prompt_tokens: int = 512


@dataclass
class RunContext:
    pair: PairSpec
    models: dict[str, LoadedModel]
    request: AnalysisRequest
    options: BaseModel
    inputs: Inputs
    progress: Progress
    limits: Limits


InputsNeeded = Literal["prompts_or_task", "prompt", "task", "text", "none"]


@dataclass
class Kind:
    name: str
    description: str
    inputs: InputsNeeded
    options: type[BaseModel]
    run: Callable[[RunContext], BaseModel]
    min_roles: int = 1
    max_roles: int | None = None
    default_roles: tuple[str, ...] | None = None  # used when the request names no roles (if the pair has them)
    # Checks and derives kind-specific inputs at submission (raises RequestError -> 422):
    # prepare(options, inputs, tokenizer) -> extra dict stored in inputs.extra
    prepare: Callable[[BaseModel, Inputs, Any], dict[str, Any]] | None = None
    summarize: Callable[[BaseModel], str] | None = None  # a few lines for the terminal
    # Checks what the kind needs beyond the models (e.g. transcoders) for these roles at submission
    # (raises RequestError -> 422) and returns a fingerprint of it, part of the result's identity.
    resources: Callable[[PairSpec, list[str]], dict[str, Any]] | None = None

    def default_roles_for(self, pair: PairSpec) -> list[str]:
        """The roles a request naming none runs on: the kind's defaults where the pair has them, else all."""
        if self.default_roles is not None and set(self.default_roles) <= set(pair.roles()):
            return list(self.default_roles)
        return list(pair.roles())

    def check_role_count(self, roles: list[str]) -> None:
        """RequestError naming `roles` unless min_roles <= len(roles) <= max_roles."""
        if len(roles) < self.min_roles:
            raise RequestError(["body", "roles"], f"{self.name} needs at least {self.min_roles} roles")
        if self.max_roles is not None and len(roles) > self.max_roles:
            raise RequestError(["body", "roles"], f"{self.name} takes at most {self.max_roles} roles; got {roles}")


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def load_builtin_kinds() -> None:
    """Import the adapters that register the built-in kinds (idempotent)."""
    import lnscope.analysis.adapters  # noqa: F401
    import lnscope.analysis.adapters_circuits  # noqa: F401
