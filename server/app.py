"""The FastAPI application. Thin: it validates, schedules and stores; analysis/ computes."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from lnscope.analysis import __version__
from lnscope.analysis.errors import LnscopeError, ModelLoadError, UnknownPairError, UnknownRoleError
from lnscope.analysis.kinds import KINDS, RequestError
from lnscope.analysis.pairs import PairRegistry, PairSpec
from lnscope.analysis.pipeline import PreparedRun, prepare_run, run_prepared
from lnscope.server.frontend import mount_api_docs, mount_frontend
from lnscope.server.jobs import Job, QueueFull
from lnscope.server.schemas import (
    AnalysisRequest,
    ErrorBody,
    Health,
    JobInfo,
    KindInfo,
    ModelsResponse,
    PairInfo,
    ResultOut,
    ResultPage,
    RoleInfo,
    TokenizeRequest,
    TokenizeResponse,
    TokenOut,
)
from lnscope.server.settings import Settings
from lnscope.server.state import ServerState
from lnscope.server.storage import ResultRow, request_hash

logger = logging.getLogger("lnscope.server")
API_PREFIX = "/api/v1"


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.headers = status, detail, headers


def _state(request: Request) -> ServerState:
    return request.app.state.lnscope


def require_token(request: Request) -> None:
    token = _state(request).settings.api_token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})


ERRORS = {404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}
public = APIRouter(prefix=API_PREFIX)
router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)], responses={401: {"model": ErrorBody}})


def _pair(state: ServerState, name: str) -> PairSpec:
    try:
        return state.registry.get(name)
    except UnknownPairError as exc:
        raise ApiError(404, str(exc)) from None


# -- models, tasks, tokenizer -------------------------------------------------------------------
@public.get("/health", response_model=Health, summary="Liveness and the device models run on")
def health(request: Request) -> Health:
    return Health(version=__version__, device=str(_state(request).device))


def _pair_info(state: ServerState, pair: PairSpec) -> PairInfo:
    roles = []
    for role, source in pair.roles().items():
        status, error = state.role_state(pair, role)
        roles.append(RoleInfo(
            role=role, hub_id=source.hub_id, revision=source.revision,
            path=str(source.path) if source.path is not None else None,
            available_locally=state.available_locally(source), loaded=status == "loaded", state=status, error=error,
        ))
    return PairInfo(name=pair.name, description=pair.description, builtin=pair.builtin,
                    default=pair.name == state.default_pair, roles=roles)


@router.get("/models", response_model=ModelsResponse, summary="Pairs, their roles and load state")
def models(request: Request) -> ModelsResponse:
    state = _state(request)
    return ModelsResponse(default_pair=state.default_pair, device=str(state.device), dtype=state.dtype_name,
                          pairs=[_pair_info(state, p) for p in state.registry])


@router.post("/models/{pair}/load", response_model=PairInfo, responses=ERRORS,
             summary="Load every model of a pair now (409 with the reason if one cannot be loaded)")
def load_models(pair: str, request: Request) -> PairInfo:
    state = _state(request)
    spec = _pair(state, pair)
    errors = state.load_pair(spec)
    if errors:
        raise ApiError(409, "; ".join(f"{role}: {msg}" for role, msg in errors.items()))
    return _pair_info(state, spec)


@router.get("/tasks", summary="Built-in tasks and their parameters")
def list_tasks() -> list[dict[str, Any]]:
    from lnscope.analysis.tasks import describe_builtin_tasks

    return describe_builtin_tasks()


@router.get("/kinds", response_model=list[KindInfo], summary="Analysis kinds, their inputs and options")
def list_kinds() -> list[KindInfo]:
    return [KindInfo(name=k.name, description=k.description, inputs=k.inputs,
                     options_schema=k.options.model_json_schema())
            for k in KINDS.values()]


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS,
             summary="Tokenize text as the pair's models see it")
def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    spec = _pair(state, body.pair)
    tokenizer, n_ctx = _tokenizer(state, spec)
    ids = tokenizer.encode(body.text, add_special_tokens=False)
    if body.prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return TokenizeResponse(pair=spec.name, n_tokens=len(ids), n_ctx=n_ctx,
                            tokens=[TokenOut(id=i, text=tokenizer.decode([i])) for i in ids])


def _tokenizer(state: ServerState, spec: PairSpec):
    try:
        return state.tokenizer(spec)
    except ModelLoadError as exc:
        raise ApiError(409, str(exc)) from None


# -- analyses -------------------------------------------------------------------------------
def _job_info(row: ResultRow) -> JobInfo:
    return JobInfo(
        id=row.id, kind=row.kind, pair=row.pair, status=row.status, progress=row.progress, stage=row.stage,
        error=row.error, error_kind=row.error_kind, created_at=row.created_at, started_at=row.started_at,
        finished_at=row.finished_at, timings=row.timings(),
        links={"job": f"{API_PREFIX}/jobs/{row.id}", "result": f"{API_PREFIX}/results/{row.id}"},
    )


def _result_out(row: ResultRow, cached: bool = False) -> ResultOut:
    return ResultOut(id=row.id, kind=row.kind, pair=row.pair, status=row.status, cached=cached, inputs=row.inputs,
                     manifest=row.manifest, timings=row.timings(),
                     result=json.loads(row.result) if row.result else None)


def _manifest_key(state: ServerState, spec: PairSpec, roles: list[str]) -> dict[str, Any]:
    return {
        "pair": spec.name,
        "roles": {r: spec.source(r).to_json() for r in roles},
        "device": str(state.device), "dtype": state.dtype_name, "lnscope": __version__,
    }


def _failure_response(row: ResultRow) -> None:
    status = {"model_load": 409, "oom": 503, "invalid": 422, "timeout": 504, "queue_full": 503}.get(
        row.error_kind or "", 500)
    headers = {"Retry-After": "30"} if status == 503 else None
    raise ApiError(status, row.error or "failed", headers)


@router.post("/analyses/{kind}", responses={**ERRORS, 202: {"model": JobInfo}, 504: {"model": ErrorBody}},
             response_model=ResultOut, summary="Run an analysis: inline with ?wait=true, else as a job (202)")
def submit_analysis(
    kind: str,
    body: AnalysisRequest,
    request: Request,
    wait: bool = Query(False, description="hold the request until the result is ready (up to `timeout`)"),
    timeout: float = Query(30.0, gt=0, le=600, description="seconds to wait with wait=true (capped by the server)"),
):
    state = _state(request)
    if kind not in KINDS:
        raise ApiError(404, f"unknown analysis kind {kind!r}; kinds: {', '.join(sorted(KINDS))}")
    return _submit(state, kind, body, wait=wait, timeout=timeout)


def _prepare(state: ServerState, kind: str, body: AnalysisRequest) -> PreparedRun:
    """The request validated and tokenized (pipeline.prepare_run), errors as the API answers them."""
    spec = _pair(state, body.pair)
    try:
        return prepare_run(kind, body, spec, state.limits)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", "options", *e["loc"])} for e in exc.errors(include_url=False)]) from None
    except UnknownRoleError as exc:
        raise ApiError(404, str(exc)) from None


def _submit(state: ServerState, kind: str, body: AnalysisRequest, *, wait: bool, timeout: float):
    """Validate, dedupe, queue and (with `wait`) wait: a stored result, or 202 with the job."""
    run = _prepare(state, kind, body)
    stored_inputs = run.stored_inputs()
    key = {**_manifest_key(state, run.pair, run.roles), **run.resources}
    digest = request_hash(kind, stored_inputs, key)
    if (done := state.store.find_done(digest)) is not None:
        return _result_out(done, cached=True)
    row = state.store.find_active(digest)
    if row is None:
        row = state.store.create(kind=kind, pair=run.pair.name, inputs=stored_inputs, req_hash=digest, manifest=None)

        def job(progress):
            progress.stage("loading models", 0.0)
            models = {role: state.load_role(run.pair, role) for role in run.roles}
            payload = run_prepared(run, models, progress).model_dump(mode="json")
            manifest = payload.pop("manifest", None)  # stored once, in the row, for every role
            return json.dumps(payload), manifest

        try:
            state.jobs.submit(Job(id=row.id, kind=kind, run=job, timeout_s=state.settings.job_timeout_s,
                                  model_keys=[f"{run.pair.source(r).describe()}|{r}" for r in run.roles]))
        except QueueFull:
            raise ApiError(503, f"the job queue is full ({state.settings.max_queue} jobs); try again later",
                           {"Retry-After": "10"}) from None
    if wait:
        state.jobs.wait(row.id, min(timeout, state.settings.inline_wait_s))
        row = state.store.get(row.id)
        if row.status == "done":
            return _result_out(row)
        if row.status in ("failed", "cancelled"):
            _failure_response(row)
    return JSONResponse(status_code=202, content=_job_info(row).model_dump(mode="json"))


@router.get("/features/{pair}/{role}/{layer}/{feature}", response_model=ResultOut,
            responses={**ERRORS, 202: {"model": JobInfo}},
            summary="A transcoder feature's page (the `feature` analysis for one role, stored like any result)")
def get_feature(
    request: Request,
    pair: str = Path(max_length=128),
    role: str = Path(max_length=32),
    layer: int = Path(ge=0, le=1000),
    feature: int = Path(ge=0, le=10_000_000),
    n_contexts: int | None = Query(None, ge=1, le=100),
):
    state = _state(request)
    spec = _pair(state, pair)
    if role not in spec.roles():
        raise ApiError(404, f"role: pair {spec.name!r} has no role {role!r}; its roles are {sorted(spec.roles())}")
    options: dict[str, Any] = {"layer": layer, "feature": feature}
    if n_contexts is not None:
        options["n_contexts"] = n_contexts
    body = AnalysisRequest(pair=pair, roles=[role], options=options)
    return _submit(state, "feature", body, wait=True, timeout=state.settings.inline_wait_s)


# -- jobs and results -----------------------------------------------------------------------
def _row(state: ServerState, result_id: str) -> ResultRow:
    try:
        uuid.UUID(result_id)
    except ValueError:
        raise ApiError(404, f"no job or result {result_id!r}") from None
    row = state.store.get(result_id)
    if row is None:
        raise ApiError(404, f"no job or result {result_id!r}")
    return row


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS, summary="Status, progress and stage of a job")
def get_job(job_id: str, request: Request) -> JobInfo:
    return _job_info(_row(_state(request), job_id))


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS,
               summary="Cancel a job (takes effect at its next stage boundary)")
def cancel_job(job_id: str, request: Request) -> JobInfo:
    state = _state(request)
    row = _row(state, job_id)
    if row.status in ("done", "failed", "cancelled"):
        raise ApiError(409, f"job {job_id} already {row.status}; finished results are kept")
    if not state.jobs.cancel(job_id):
        state.store.fail(job_id, "cancelled by request", "cancelled", status="cancelled")
    state.jobs.wait(job_id, 2.0)
    return _job_info(state.store.get(job_id))


@router.get("/results/{result_id}", response_model=ResultOut, responses=ERRORS,
            summary="A stored result and its manifest")
def get_result(result_id: str, request: Request) -> ResultOut:
    return _result_out(_row(_state(request), result_id))


@router.get("/results", response_model=ResultPage, summary="Stored results, newest first (paginated)")
def list_results(
    request: Request,
    pair: str | None = Query(None, max_length=128),
    kind: str | None = Query(None, max_length=64),
    status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> ResultPage:
    total, rows = _state(request).store.history(pair=pair, kind=kind, status=status, limit=limit, offset=offset)
    return ResultPage(total=total, limit=limit, offset=offset, items=[_job_info(r) for r in rows])


# -- the application ------------------------------------------------------------------------
def create_app(settings: Settings | None = None, registry: PairRegistry | None = None, cache=None) -> FastAPI:
    settings = settings or Settings.from_env()
    state = ServerState(settings, registry=registry, cache=cache)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="lnscope", version=__version__,
        description="Compare a transformer with its LayerNorm-free twin: exact DLA, patching, confidence "
                    "neurons, LN statistics. Long analyses run as jobs; every result is stored and shareable.",
        openapi_url=f"{API_PREFIX}/openapi.json", docs_url=None, redoc_url=None, lifespan=lifespan,
    )
    app.state.lnscope = state
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail}, headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(exc.loc), "msg": exc.message, "type": "value_error"}]})

    @app.exception_handler(UnknownRoleError)
    async def _unknown_role(_: Request, exc: UnknownRoleError):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ModelLoadError)
    async def _model_load(_: Request, exc: ModelLoadError):
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(LnscopeError)
    async def _lnscope_error(_: Request, exc: LnscopeError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    app.include_router(public)
    app.include_router(router)
    mount_api_docs(app, app.openapi_url)
    mount_frontend(app)
    return app
