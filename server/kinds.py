"""The analysis kinds the API serves: each maps a validated request onto one analysis/ call.

Nothing here computes: an adapter prepares plain inputs (tokens, a task batch, text) from the
request and hands them, with the loaded models, to the analysis module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from analysis.errors import LnscopeError
from analysis.loading import LoadedModel
from analysis.pairs import PairSpec
from analysis.progress import Progress

from server.schemas import AnalysisRequest
from server.settings import Settings


class RequestError(LnscopeError, ValueError):
    """Invalid input found while preparing a request: answered with 422 naming the field."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


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


@dataclass
class RunContext:
    pair: PairSpec
    models: dict[str, LoadedModel]
    request: AnalysisRequest
    options: BaseModel
    inputs: Inputs
    progress: Progress
    settings: Settings


InputsNeeded = Literal["prompts_or_task", "task", "text", "feature", "none"]


@dataclass
class Kind:
    name: str
    description: str
    inputs: InputsNeeded
    options: type[BaseModel]
    run: Callable[[RunContext], BaseModel]
    min_roles: int = 1
    # Checks and derives kind-specific inputs at submission (raises RequestError -> 422):
    # prepare(options, inputs, tokenizer) -> extra dict stored in inputs.extra
    prepare: Callable[[BaseModel, Inputs, Any], dict[str, Any]] | None = None


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def load_builtin_kinds() -> None:
    """Import the adapters that register the built-in kinds (idempotent)."""
    import server.adapters  # noqa: F401
