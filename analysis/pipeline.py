"""One request pipeline for the REST API and `lnscope analyze`: request -> prepared run -> units -> combine.

`prepare_run` validates a request against its kind and the pair, and tokenizes its inputs with the
pair's tokenizer, before any model loads. `run_units` runs the kind's per-role unit on each model (the
lead role first when the kind shares what it chose) and combines the partial results under one
manifest. `analyze` does both for a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from lnscope.analysis.errors import UnknownRoleError
from lnscope.analysis.eval_text import pair_eval_text
from lnscope.analysis.inputs import prepare_inputs
from lnscope.analysis.kinds import KINDS
from lnscope.analysis.kinds.base import CombineContext, Inputs, Kind, KindOptions, Limits, RequestError, UnitContext
from lnscope.analysis.kinds.costs import Cost, ModelShape, check_budget
from lnscope.analysis.loading import LoadedModel, model_cache, pair_config, pair_tokenizer
from lnscope.analysis.pairs import PairRegistry, PairSpec
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.requests import AnalysisRequest
from lnscope.analysis.results import make_manifest


@dataclass
class PreparedRun:
    """A validated request: its kind, pair, roles, typed options and tokenized inputs."""

    kind: Kind
    pair: PairSpec
    request: AnalysisRequest
    roles: list[str]
    options: KindOptions
    inputs: Inputs
    resources: dict[str, Any]  # fingerprints of what the kind reads beyond the models (e.g. transcoders)
    cost: Cost  # one role's estimated work

    def stored_inputs(self) -> dict[str, Any]:
        """The request as stored with its result: roles and options resolved to what runs."""
        return {**self.request.model_dump(mode="json"), "roles": self.roles,
                "options": self.options.model_dump(mode="json")}


def get_kind(name: str) -> Kind:
    """The kind called `name`, or a RequestError listing the kinds."""
    if name not in KINDS:
        raise RequestError(["path", "kind"], f"unknown analysis kind {name!r}; kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def resolve_roles(kind: Kind, request: AnalysisRequest, pair: PairSpec) -> list[str]:
    """The roles to run: the request's (each one the pair has), else the kind's defaults for the pair."""
    roles = list(request.roles or kind.default_roles_for(pair))
    for i, role in enumerate(roles):
        if role not in pair.roles():
            raise UnknownRoleError(f"roles[{i}]: pair {pair.name!r} has no role {role!r}; "
                                   f"its roles are {sorted(pair.roles())}")
    kind.check_role_count(roles)
    return roles


def prepare_run(kind_name: str, request: AnalysisRequest, pair: PairSpec, limits: Limits) -> PreparedRun:
    """Validate `request` for `kind_name` on `pair` and prepare its inputs; no model is loaded.

    Raises pydantic's ValidationError for bad options (locations inside `options`), RequestError
    (-> 422) naming the field for bad inputs or saying the estimated cost and the budget it exceeds,
    UnknownRoleError for a role the pair lacks.
    """
    kind = get_kind(kind_name)
    options = kind.options.model_validate(request.options)
    roles = resolve_roles(kind, request, pair)
    resources = kind.resources(pair, roles) if kind.resources is not None else {}
    tokenizer, n_ctx = pair_tokenizer(pair)
    inputs = prepare_inputs(kind, request, tokenizer, n_ctx, limits, default_text=lambda: pair_eval_text(pair))
    if kind.prepare is not None:
        inputs.extra = kind.prepare(options, inputs, tokenizer, limits, n_ctx)
    cost = kind.cost(options, inputs, ModelShape.from_config(pair_config(pair))) if kind.cost else Cost(0)
    check_budget(cost, len(roles), limits.max_forward_passes, limits.max_graph_bytes)
    return PreparedRun(kind=kind, pair=pair, request=request, roles=roles, options=options, inputs=inputs,
                       resources=resources, cost=cost)


UnitRunner = Callable[[str, dict[str, Any], Progress], BaseModel]  # (role, shared, progress) -> partial


def execute_units(kind: Kind, roles: list[str], run_unit: UnitRunner,
                  progress: Progress | None = None) -> tuple[dict[str, BaseModel], str]:
    """Each role's partial result, in the result's role order, and the lead role.

    `run_unit(role, shared, progress)` runs the kind's unit for one role, wherever the model lives.
    Units run in the result's order; when the kind `shares`, the lead runs first and what it chose
    reaches the others.
    """
    progress = ensure(progress)
    roles = kind.in_result_order(roles)
    lead = kind.lead_role(roles)
    run_order = [lead] + [r for r in roles if r != lead] if kind.shares is not None else roles
    partials: dict[str, BaseModel] = {}
    shared: dict[str, Any] = {}
    for i, role in enumerate(run_order):
        partials[role] = run_unit(role, shared, progress.span(f"{role}: ", i / len(roles), (i + 1) / len(roles)))
        if kind.shares is not None and role == lead:
            shared = kind.shares(partials[role])
    return {role: partials[role] for role in roles}, lead


def combine_partials(kind: Kind, partials: Mapping[str, BaseModel], models: Mapping[str, LoadedModel], *,
                     lead: str, inputs: Inputs, options: KindOptions, pair: PairSpec | None, seed: int) -> BaseModel:
    """The kind's combine step under one manifest, with an entry per role (in the partials' order)."""
    manifest = make_manifest(kind.name, {role: models[role] for role in partials},
                             pair=None if pair is None else pair.name, seed=seed,
                             options=options.model_dump(mode="json"))
    context = CombineContext(pair=pair, options=options, inputs=inputs, seed=seed, manifest=manifest, lead=lead)
    return kind.combine(partials, context)


def run_units(kind: Kind, models: Mapping[str, LoadedModel], inputs: Inputs, options: KindOptions, *,
              pair: PairSpec | None = None, seed: int = 0, progress: Progress | None = None) -> BaseModel:
    """The kind's unit on every model in this process (each in its share of `progress`), then its combine step.

    `pair` names the models' pair (kinds that read transcoders need it).
    """

    def run_unit(role: str, shared: dict[str, Any], span: Progress) -> BaseModel:
        return kind.unit(UnitContext(model=models[role], inputs=inputs, options=options, seed=seed, pair=pair,
                                     progress=span, shared=shared))

    partials, lead = execute_units(kind, list(models), run_unit, progress)
    return combine_partials(kind, partials, models, lead=lead, inputs=inputs, options=options, pair=pair, seed=seed)


def run_prepared(run: PreparedRun, models: Mapping[str, LoadedModel], progress: Progress | None = None) -> BaseModel:
    """`run_units` for a prepared request, on its roles' models."""
    return run_units(run.kind, {role: models[role] for role in run.roles}, run.inputs, run.options, pair=run.pair,
                     seed=run.request.seed, progress=progress)


def analyze(kind: str, pair: str | PairSpec = "tiny", *, device: str | None = None, dtype: str | None = None,
            limits: Limits | None = None, progress: Progress | None = None, **request: Any) -> BaseModel:
    """Run one analysis kind in this process, e.g. `analyze("dla", "tiny", task={"name": "ioi"})`.

    `request` takes the fields of an API request (roles, prompts, task, text, options, seed).
    """
    spec = pair if isinstance(pair, PairSpec) else PairRegistry.load().get(pair)
    run = prepare_run(kind, AnalysisRequest(pair=spec.name, **request), spec, limits or Limits())
    models = model_cache.load_pair(spec, run.roles, device=device, dtype=dtype)
    return run_prepared(run, models, progress)
