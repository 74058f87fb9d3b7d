"""What every analysis kind is made of: options, prepared inputs, a per-role unit and a combine step.

A kind's **unit** does all the work that needs one model: given the loaded model, the prepared inputs
and the options, it returns a typed partial result (a pydantic model: it serialises and pickles). Its
**combine** step is pure: it turns the partials of every role into the result (differences, matching,
tables), with no model. The same units run on in-process workers or on model workers elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, Mapping, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.pairs import ROLES, PairSpec
from lnscope.analysis.progress import Progress
from lnscope.analysis.requests import TokenText
from lnscope.analysis.results import Manifest

P = TypeVar("P", bound=BaseModel)  # a unit's partial result
R = TypeVar("R", bound=BaseModel)  # a kind's result


class RequestError(LnscopeError, ValueError):
    """Invalid input found while preparing a request: answered with 422 naming the field."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message

    def __str__(self) -> str:
        field_name = ".".join(str(part) for part in self.loc if part != "body")
        return f"{field_name}: {self.message}" if field_name else self.message


class KindOptions(BaseModel):
    """A kind's options: unknown fields, NaN and Infinity are refused; every default is stated here, once."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NoOptions(KindOptions):
    pass


@dataclass
class Inputs:
    """A request's inputs as the units read them; which fields are set depends on the kind's inputs."""

    tokens: torch.Tensor | None = None  # [batch, pos], BOS prepended, right-padded
    end_pos: torch.Tensor | None = None  # [batch]: the last real position of each row
    lengths: list[int] | None = None  # [batch]: real tokens per row (text inputs)
    task: Any = None  # a tasks.TaskBatch (clean / corrupt tokens and the metric)
    texts: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the kind's `prepare` derived (e.g. a target)


@dataclass(frozen=True)
class Limits:
    """Bounds on one request's inputs (the server's are configurable)."""

    max_prompts: int = 64
    max_prompt_tokens: int = 512
    max_forward_passes: int | None = None  # estimated whole-model passes of a request, every role together
    max_graph_bytes: int | None = None  # the largest attribution graph a request may hold


@dataclass
class UnitContext(Generic[P]):
    """Everything a per-role unit reads: one model, the prepared inputs, the options.

    `shared` is what the lead role's partial fixed for the other roles (empty for the lead itself).
    """

    model: LoadedModel
    inputs: Inputs
    options: Any
    seed: int
    pair: PairSpec | None  # None for models outside any registered pair (kinds reading transcoders need one)
    progress: Progress
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.model.role

    @property
    def pair_name(self) -> str | None:
        return None if self.pair is None else self.pair.name


@dataclass
class CombineContext:
    """What a combine step reads besides the partials: the request's options, inputs and manifest.

    `lead` is the role whose partial the others followed (see `Kind.shares`), or the first in `ROLES`.
    """

    pair: PairSpec | None
    options: Any
    inputs: Inputs
    seed: int
    manifest: Manifest
    lead: str

    @property
    def pair_name(self) -> str | None:
        return None if self.pair is None else self.pair.name


InputsNeeded = Literal["prompts_or_task", "prompt", "task", "text", "none"]
RoleOrder = Literal["request", "roles", "paper"]
_ORDERS: dict[str, tuple[str, ...]] = {"roles": ROLES, "paper": ("original", "control", "ln_free")}


@dataclass(frozen=True)
class Kind(Generic[P, R]):
    """One analysis kind: its options, inputs, per-role unit and combine step.

    - `prepare(options, inputs, tokenizer) -> dict` checks and derives kind-specific inputs at
      submission (raising RequestError -> 422); the dict lands in `inputs.extra`.
    - `shares(partial) -> dict`, when set, makes the lead role (the first in `ROLES` order) run first:
      what it returns (e.g. the logit targets it chose) reaches every other role's unit as `shared`.
    - `resources(pair, roles) -> dict` checks what the kind needs beyond the models (e.g. transcoders)
      and returns a fingerprint of it, part of the result's identity.
    - `cost(options, inputs, shape) -> Cost` estimates one role's work before anything runs.
    - `result_order`: the order of roles in the result (as requested, `ROLES`, or the paper's table).
    """

    name: str
    description: str
    inputs: InputsNeeded
    options: type[KindOptions]
    unit: Callable[[UnitContext], P]
    combine: Callable[[Mapping[str, P], CombineContext], R]
    min_roles: int = 1
    max_roles: int | None = None
    default_roles: tuple[str, ...] | None = None
    prepare: Callable[[Any, Inputs, Any, Limits, int], dict[str, Any]] | None = None
    shares: Callable[[P], dict[str, Any]] | None = None
    resources: Callable[[PairSpec, list[str]], dict[str, Any]] | None = None
    summarize: Callable[[R], str] | None = None
    cost: Callable[[Any, Inputs, Any], Any] | None = None
    result_order: RoleOrder = "request"

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

    def lead_role(self, roles: list[str]) -> str:
        """The role whose unit runs first when the kind `shares` (the first in `ROLES` order)."""
        return ordered(roles, ROLES)[0]

    def in_result_order(self, roles: list[str]) -> list[str]:
        return roles if self.result_order == "request" else ordered(roles, _ORDERS[self.result_order])


def ordered(roles: list[str], order: tuple[str, ...]) -> list[str]:
    """`roles` in `order`, roles outside it after, as given."""
    return [r for r in order if r in roles] + [r for r in roles if r not in order]


def single_token(tokenizer, text: str, loc: list[str | int]) -> int:
    """The one token id of `text`, or a RequestError at `loc` listing the pieces it splits into."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise RequestError(loc,
                           f"{text!r} is {len(ids)} tokens {pieces} for this pair's tokenizer; give a single token")
    return ids[0]


class TargetIn(BaseModel):
    """A logit or a logit difference, named by token strings (each one token for the pair's tokenizer)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["logit", "logit_diff"] = Field(examples=["logit_diff"])
    token: TokenText = Field(description="the token whose logit is attributed", examples=[" Mary"])
    other: TokenText | None = Field(default=None, description="logit_diff: the token subtracted", examples=[" John"])
