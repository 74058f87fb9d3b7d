"""The FastAPI application. Thin: it validates, schedules and stores; analysis/ computes."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request

from analysis import __version__
from analysis.pairs import PairRegistry

from server.schemas import Health, ModelsResponse, PairInfo, RoleInfo
from server.settings import Settings
from server.state import ServerState

logger = logging.getLogger("lnscope.server")
API_PREFIX = "/api/v1"


def _state(request: Request) -> ServerState:
    return request.app.state.lnscope


router = APIRouter(prefix=API_PREFIX)


@router.get("/health", response_model=Health, summary="Liveness and the device models run on")
def health(request: Request) -> Health:
    return Health(version=__version__, device=str(_state(request).device))


@router.get("/models", response_model=ModelsResponse, summary="Pairs, their roles and load state")
def models(request: Request) -> ModelsResponse:
    state = _state(request)
    pairs = []
    for pair in state.registry:
        roles = []
        for role, source in pair.roles().items():
            status, error = state.role_state(pair, role)
            roles.append(
                RoleInfo(
                    role=role,
                    hub_id=source.hub_id,
                    revision=source.revision,
                    path=str(source.path) if source.path is not None else None,
                    available_locally=state.available_locally(source),
                    loaded=status == "loaded",
                    state=status,
                    error=error,
                )
            )
        pairs.append(
            PairInfo(
                name=pair.name,
                description=pair.description,
                builtin=pair.builtin,
                default=pair.name == state.default_pair,
                roles=roles,
            )
        )
    return ModelsResponse(default_pair=state.default_pair, device=str(state.device), dtype=state.dtype_name, pairs=pairs)


def create_app(settings: Settings | None = None, registry: PairRegistry | None = None, cache=None) -> FastAPI:
    settings = settings or Settings.from_env()
    state = ServerState(settings, registry=registry, cache=cache)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload:
            logger.info("loading pair %s on %s in the background", state.default_pair, state.device)
            state.preload_in_background()
        yield

    app = FastAPI(
        title="lnscope",
        version=__version__,
        description="Compare a transformer with its LayerNorm-free twin.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
        lifespan=lifespan,
    )
    app.state.lnscope = state
    app.include_router(router)
    return app
