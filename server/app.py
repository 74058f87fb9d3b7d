"""The FastAPI application. Thin: it validates, schedules and stores; analysis/ computes."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from lnscope.analysis import __version__
from lnscope.analysis.errors import LnscopeError, ModelLoadError, UnknownPairError, UnknownRoleError
from lnscope.analysis.kinds import KINDS, RequestError
from lnscope.analysis.pairs import ModelSource, PairRegistry, PairSpec
from lnscope.analysis.pipeline import PreparedRun, prepare_run
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.server.frontend import mount_api_docs, mount_frontend
from lnscope.server.jobs import Job, QueueFull, TooManyWaiters
from lnscope.server.middleware import MaxBodySize
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
    WorkersResponse,
)
from lnscope.server.settings import Settings
from lnscope.server.state import ServerState
from lnscope.server.storage import ResultRow, StoreUnavailable, request_hash

logger = logging.getLogger("lnscope.server")
API_PREFIX = "/api/v1"


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.headers = status, detail, headers


def _state(request: Request) -> ServerState:
    return request.app.state.lnscope


TOKEN_COOKIE = "lnscope_token"  # set by the web UI: lets a browser open the API docs of a server with a token


def _token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of bytes: headers arrive as latin-1 text, the token is UTF-8."""
    try:
        given_bytes = given.encode("latin-1")
    except UnicodeEncodeError:
        given_bytes = given.encode("utf-8", "surrogateescape")
    return secrets.compare_digest(given_bytes, token.encode("utf-8"))


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def require_token(request: Request) -> None:
    """401 unless the request carries the server's bearer token (when it has one)."""
    token = _state(request).settings.api_token
    if token and not _token_matches(_bearer(request), token):
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})


def require_token_for_docs(request: Request) -> None:
    """As require_token, also accepting the UI's cookie: the docs pages are opened by a browser (GET only)."""
    token = _state(request).settings.api_token
    if token and not (_token_matches(_bearer(request), token)
                      or _token_matches(unquote(request.cookies.get(TOKEN_COOKIE, "")), token)):
        raise ApiError(401, "missing or wrong token: enter it in the web UI (which sets a cookie for the docs) or "
                       "send Authorization: Bearer ...", {"WWW-Authenticate": "Bearer"})


ERRORS = {404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}
public = APIRouter(prefix=API_PREFIX)
router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)], responses={401: {"model": ErrorBody}})


def _pair(state: ServerState, name: str) -> PairSpec:
    try:
        return state.registry.get(name)
    except UnknownPairError as exc:
        raise ApiError(404, str(exc)) from None


# -- models, tasks, tokenizer -------------------------------------------------------------------
@public.get("/health", response_model=Health, responses={503: {"model": Health}},
            summary="Liveness: the device, the database's last check and the workers (503 when degraded)")
async def health(request: Request):
    """Answered on the event loop from state kept by the maintenance thread: never waits on a busy server."""
    state = _state(request)
    report = state.health()
    body = Health(status="ok" if report["ok"] else "degraded", version=__version__, device=str(state.device),
                  database=report["database"], workers=report["workers"])
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if report["ok"] else 503)


def _pair_info(state: ServerState, pair: PairSpec) -> PairInfo:
    roles = []
    for role, source in pair.roles().items():
        status, error = state.role_state(pair, role)
        roles.append(RoleInfo(
            role=role, hub_id=source.hub_id, revision=source.revision,
            path=source.portable() if source.path is not None else None,
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
        error=row.error, error_kind=row.error_kind, inputs=row.inputs, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, timings=row.timings(),
        links={"job": f"{API_PREFIX}/jobs/{row.id}", "result": f"{API_PREFIX}/results/{row.id}"},
    )


_NO_RESULT = b',"result":null}'


def _result_out(row: ResultRow, cached: bool = False) -> Response:
    """A row as ResultOut's JSON. The stored result text goes into the body as it is: no parse, no validation and
    no second serialisation of what can be megabytes; ResultOut serialises the rest. Text that is not a JSON object
    or that holds NaN / Infinity (rows stored before results were written by pydantic's encoder may) is parsed and
    validated as before, so the body is always JSON with non-finite numbers as null."""
    fields = dict(id=row.id, kind=row.kind, pair=row.pair, status=row.status, cached=cached, inputs=row.inputs,
                  manifest=row.manifest, timings=row.timings())
    text = row.result
    if text and text[0] == "{" and "NaN" not in text and "Infinity" not in text:
        head = ResultOut(**fields, result=None).model_dump_json().encode()
        if head.endswith(_NO_RESULT):  # `result` is ResultOut's last field
            return Response(b"".join((head[: -len(_NO_RESULT)], b',"result":', text.encode(), b"}")),
                            media_type="application/json")
    body = ResultOut(**fields, result=json.loads(text) if text else None).model_dump_json()
    return Response(body.encode(), media_type="application/json")


WEIGHTS_KEY_TTL_S = 2.0  # how long a role's manifest-key entry is reused while its weight files' stats are unchanged
_weights_keys: dict[tuple, tuple[float, tuple, dict[str, Any]]] = {}  # (source, models dir) -> (when, stats, entry)
_weights_keys_lock = threading.Lock()


def _weight_files(path: os.PathLike[str]) -> tuple | None:
    """Names, sizes and modification times of the files in a weights directory (what `ModelSource.fingerprint`
    digests), in one directory scan; None when it cannot be read (then nothing is cached)."""
    try:
        with os.scandir(path) as entries:
            return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e in entries if e.is_file()
                                for st in (e.stat(),)))
    except OSError:
        return None


def _role_key(source: ModelSource) -> dict[str, Any]:
    """A role's part of the cache key: where its weights are and their fingerprint. For a local directory the
    entry is reused for up to WEIGHTS_KEY_TTL_S while a scan of its files finds the same names, sizes and times:
    weights replaced at the same path change the key at once."""
    if source.path is None:
        return {**source.to_json(), "weights": source.fingerprint()}
    key = (source, os.environ.get("LNSCOPE_MODELS_DIR"))
    files, now = _weight_files(source.path), time.monotonic()
    with _weights_keys_lock:
        hit = _weights_keys.get(key)
    if files is not None and hit is not None and hit[1] == files and now - hit[0] < WEIGHTS_KEY_TTL_S:
        return hit[2]
    entry = {**source.to_json(), "weights": source.fingerprint()}  # after the scan: a change in between rescans
    if files is not None:
        with _weights_keys_lock:
            if len(_weights_keys) >= 1024:  # request-defined pairs must not grow it without bound
                _weights_keys.clear()
            _weights_keys[key] = (now, files, entry)
    return entry


def _manifest_key(state: ServerState, spec: PairSpec, roles: list[str]) -> dict[str, Any]:
    return {
        "pair": spec.name,
        "roles": {r: dict(_role_key(spec.source(r))) for r in roles},
        "device": str(state.device), "dtype": state.dtype_name, "lnscope": __version__,
    }


def _failure_response(row: ResultRow) -> None:
    status = {"model_load": 409, "oom": 503, "invalid": 422, "timeout": 504, "queue_full": 503, "cancelled": 409,
              "interrupted": 503, "database": 503, "worker_died": 503}.get(row.error_kind or "", 500)
    headers = {"Retry-After": "30"} if status == 503 else None
    raise ApiError(status, row.error or "failed", headers)


@router.post("/analyses/{kind}", responses={**ERRORS, 202: {"model": JobInfo}, 504: {"model": ErrorBody}},
             response_model=ResultOut, summary="Run an analysis: inline with ?wait=true, else as a job (202)")
async def submit_analysis(
    kind: str,
    body: AnalysisRequest,
    request: Request,
    wait: bool = Query(False, description="hold the request until the result is ready (up to `timeout`)"),
    timeout: float = Query(30.0, gt=0, le=600, description="seconds to wait with wait=true (capped by the server)"),
):
    state = _state(request)
    if kind not in KINDS:
        raise ApiError(404, f"unknown analysis kind {kind!r}; kinds: {', '.join(sorted(KINDS))}")
    return await _submit(state, request, kind, body, wait=wait, timeout=timeout)


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


PROGRESS_WRITE_S = 0.5  # a job's stage and fraction are written to the store at most this often


class _ProgressFlusher:
    """One daemon thread that writes the held reports of every ThrottledProgress when their interval is over."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, ThrottledProgress]] = []  # a heap of (when, tie-breaker, progress)
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, progress: "ThrottledProgress") -> None:
        with self._cond:
            heapq.heappush(self._due, (when, next(self._order), progress))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lnscope-progress", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or (wait := self._due[0][0] - time.monotonic()) > 0:
                    self._cond.wait(None if not self._due else wait)
                progress = heapq.heappop(self._due)[2]
            try:
                progress._on_due()
            except Exception:  # never let one job's write stop the others'
                logger.exception("writing a job's progress failed")


_flusher = _ProgressFlusher()


class ThrottledProgress(Progress):
    """A job's progress as the store sees it, written at most every `interval` seconds: a report that comes sooner
    is held (only the newest) and written once the interval is over, by a shared flusher thread if the job reports
    nothing more by then. A short job writes none (its row goes from running to done); a long one shows its
    current stage within `interval`. Cancellation and the time limit are still checked at every stage boundary."""

    def __init__(self, inner: Progress, interval: float | None = None) -> None:
        super().__init__(self._report)
        self._inner, self._interval = inner, PROGRESS_WRITE_S if interval is None else interval
        self._lock = threading.Lock()  # held while writing: writes never overtake each other
        self._pending: tuple[str, float] | None = None
        self._written = time.monotonic()  # the job was just marked running
        self._scheduled = False  # the flusher will look at this progress
        self._closed = False

    def check(self) -> None:
        self._inner.check()

    def _hold(self) -> bool:
        """Whether the held report must wait (then the flusher is told when to look again); caller holds the lock."""
        wait = self._written + self._interval - time.monotonic()
        if wait <= 0:
            return False
        if not self._scheduled:
            self._scheduled = True
            _flusher.schedule(time.monotonic() + wait, self)
        return True

    def _report(self, stage: str, fraction: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending = (stage, fraction)
            if self._hold():
                return
        self.flush()

    def _on_due(self) -> None:
        with self._lock:
            self._scheduled = False
            if self._closed or self._pending is None or self._hold():
                return
        self.flush()

    def flush(self) -> None:
        """Write the held report now, if there is one."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None or self._closed:
                return
            self._written = time.monotonic()
            try:
                self._inner.stage(*pending)  # the job runner's report (best effort), then its check
            except Cancelled:  # raised again at the job's own next stage boundary
                pass

    def close(self, flush: bool) -> None:
        """No more writes; with `flush`, the held report is written first (a failed job keeps its last stage)."""
        if flush:
            self.flush()
        with self._lock:
            self._closed = True


def _stored_result(result: BaseModel) -> tuple[str, dict | None]:
    """(result JSON without its manifest, manifest): the manifest is stored once, in the row, for every role. The
    text is pydantic's JSON, as the API answers it (NaN / Infinity as null); json.dumps for what it refuses."""
    manifest = result.model_dump(mode="json", include={"manifest"}).get("manifest")
    try:
        return result.model_dump_json(exclude={"manifest"}), manifest
    except PydanticSerializationError:
        payload = result.model_dump(mode="json")
        payload.pop("manifest", None)
        return json.dumps(payload), manifest


def _job_for(state: ServerState, run: PreparedRun, row_id: str) -> Job:
    """The queued work of a prepared run: its units on the executor's models, the combined result stored."""

    def job(progress):
        throttled = ThrottledProgress(progress)
        try:
            result = state.executor.run(run, throttled, time_limit_s=state.settings.job_timeout_s)
        except BaseException:
            throttled.close(flush=True)
            raise
        throttled.close(flush=False)  # the row's stage becomes "done" with the result
        return _stored_result(result)

    return Job(id=row_id, kind=run.kind.name, run=job, timeout_s=state.settings.job_timeout_s,
               reserve_bytes=run.cost.graph_bytes,
               model_keys=[f"{run.pair.source(r).describe()}|{r}" for r in run.roles])


def _enqueue(state: ServerState, kind: str, body: AnalysisRequest) -> tuple[ResultRow, bool]:
    """Validate, dedupe and queue (blocking work: run in a thread). (row, done): a stored result or the job."""
    run = _prepare(state, kind, body)
    stored_inputs = run.stored_inputs()
    digest = request_hash(kind, stored_inputs, {**_manifest_key(state, run.pair, run.roles), **run.resources})
    if (found := state.store.find_reusable(digest)) is not None:
        return found, found.status == "done"
    row, created = state.store.create_or_get_active(kind=kind, pair=run.pair.name, inputs=stored_inputs,
                                                    req_hash=digest, manifest=None)
    if created:
        try:
            state.jobs.submit(_job_for(state, run, row.id))
        except QueueFull:
            state.store.discard(row.id)  # refused work leaves no history row
            raise ApiError(503, f"the job queue is full ({state.settings.max_queue} jobs); try again later",
                           {"Retry-After": "10"}) from None
        except ValueError as exc:  # larger than the whole graph-memory budget
            state.store.discard(row.id)
            raise ApiError(422, str(exc)) from None
    return row, False


async def _submit(state: ServerState, request: Request, kind: str, body: AnalysisRequest, *, wait: bool,
                  timeout: float):
    """A stored result, or (after waiting, with `wait`) the new one, or 202 with the job. Waiting holds no
    thread, ends early when the client leaves, and is refused (503) beyond the server's number of waiters."""
    row, cached = await run_in_threadpool(_enqueue, state, kind, body)
    if cached:
        return _result_out(row, cached=True)
    if wait:
        job = state.jobs.get(row.id)  # a job of this server hands back its finished row: no second read
        try:
            await state.jobs.wait_async(row.id, min(timeout, state.settings.inline_wait_s), request.is_disconnected)
        except TooManyWaiters:
            raise ApiError(503, f"{state.settings.max_waiters} requests are already waiting inline; poll "
                           f"{API_PREFIX}/jobs/{row.id} instead", {"Retry-After": "5"}) from None
        stored = job.stored if job is not None else None
        row = stored if stored is not None else await run_in_threadpool(state.store.get, row.id)
        if row.status == "done":
            return _result_out(row)
        if row.status in ("failed", "cancelled"):
            _failure_response(row)
    return JSONResponse(status_code=202, content=_job_info(row).model_dump(mode="json"))


@router.get("/features/{pair}/{role}/{layer}/{feature}", response_model=ResultOut,
            responses={**ERRORS, 202: {"model": JobInfo}},
            summary="A transcoder feature's page (the `feature` analysis for one role, stored like any result)")
async def get_feature(
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
    return await _submit(state, request, "feature", body, wait=True, timeout=state.settings.inline_wait_s)


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


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS,
            summary="Status, progress, stage and queue position of a job")
def get_job(job_id: str, request: Request) -> JobInfo:
    state = _state(request)
    info = _job_info(_row(state, job_id))
    if info.status == "queued":
        info.queue_position = state.jobs.queue_position(job_id)
    return info


@router.get("/workers", response_model=WorkersResponse,
            summary="Model workers: pair, role, node, device, memory, state, queue length, jobs done")
def list_workers(request: Request) -> WorkersResponse:
    state = _state(request)
    return WorkersResponse(executor=state.executor.name, workers=state.executor.workers())


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS,
               summary="Cancel a job (takes effect at its next stage boundary)")
async def cancel_job(job_id: str, request: Request) -> JobInfo:
    state = _state(request)
    row = await run_in_threadpool(_row, state, job_id)
    if row.status in ("done", "failed", "cancelled"):
        raise ApiError(409, f"job {job_id} already {row.status}; finished results are kept")
    if not state.jobs.cancel(job_id):
        await run_in_threadpool(state.store.fail, job_id, "cancelled by request", "cancelled", status="cancelled")
    await state.jobs.wait_async(job_id, 2.0)
    return _job_info(await run_in_threadpool(state.store.get, job_id))


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
def _json_safe(value: Any) -> Any:
    """A validation error's input as JSON can carry it: NaN, Infinity and lone surrogates as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int)) else _json_safe(str(value))


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """Body size (outermost, before anything reads the body), trusted Host headers, CORS."""
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    if settings.allowed_hosts is not None:  # a page on another name (DNS rebinding) cannot reach the server
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(MaxBodySize, max_bytes=settings.max_body_bytes)


def _add_error_handlers(app: FastAPI) -> None:
    """Every expected error as a 4xx with a message; validation errors as the list of invalid fields."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail}, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        issues = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "value_error"),
                   **({"input": _json_safe(e["input"])} if "input" in e else {})} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": _json_safe(issues)})

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(exc.loc), "msg": exc.message, "type": "value_error"}]})

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(_: Request, exc: StoreUnavailable):
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "30"})

    @app.exception_handler(UnknownRoleError)
    async def _unknown_role(_: Request, exc: UnknownRoleError):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ModelLoadError)
    async def _model_load(_: Request, exc: ModelLoadError):
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(LnscopeError)
    async def _lnscope_error(_: Request, exc: LnscopeError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})


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
        openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan,
    )
    app.state.lnscope = state
    _add_middleware(app, settings)
    _add_error_handlers(app)
    app.include_router(public)
    app.include_router(router)
    openapi_url = f"{API_PREFIX}/openapi.json"

    @app.get(openapi_url, include_in_schema=False, dependencies=[Depends(require_token_for_docs)])
    def openapi_spec() -> JSONResponse:
        return JSONResponse(app.openapi())

    mount_api_docs(app, openapi_url, dependencies=[Depends(require_token_for_docs)])
    mount_frontend(app)
    return app
