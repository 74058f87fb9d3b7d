"""The web frontend and the API docs, all served from installed packages (no CDN, no build step).

- `/`, `/css`, `/js`: the static ES modules of `lnscope.frontend`, found through importlib.resources;
- `/vendor/plotly.min.js`: the Plotly.js that the plotly package ships in its package data;
- `/docs`, `/redoc`: Swagger UI and ReDoc pages whose scripts are the assets vendored by fastapi-offline.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

PLOTLY_ROUTE = "/vendor/plotly.min.js"
DOCS_ASSETS_ROUTE = "/vendor/api-docs"
# ReDoc's side menu shows its maker's logo from a CDN; served from here, the page makes no outside request.
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# The docs pages may load their own scripts, styles and images, nothing from elsewhere.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")

# Small, revalidated on every load (ETag / Last-Modified), so an upgrade is picked up at once.
_NO_STALE = {"Cache-Control": "no-cache"}


def frontend_dir() -> Path:
    """The installed `lnscope.frontend` package's folder (index.html, css/, js/)."""
    return Path(str(resources.files("lnscope.frontend")))


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's scripts and styles as fastapi-offline ships them."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def plotly_js_path() -> Path:
    """The plotly.min.js bundled with the installed plotly package."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():  # pragma: no cover - a broken plotly install
        raise FileNotFoundError(f"plotly.min.js not found at {path}")
    return path


class _Static(StaticFiles):
    """StaticFiles with a revalidation header and the right type for ES modules."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(_NO_STALE)
        if str(args[0] if args else kwargs.get("full_path", "")).endswith(".js"):
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


def mount_api_docs(app: FastAPI, openapi_url: str, dependencies: Sequence[Any] = ()) -> None:
    """Swagger UI at /docs and ReDoc at /redoc (behind `dependencies`), their assets under /vendor/api-docs."""
    title = f"{app.title} API"
    favicon = f"{DOCS_ASSETS_ROUTE}/favicon.png"
    redoc_js = (docs_assets_dir() / "redoc.standalone.js").read_text().replace(REDOC_CDN_LOGO, favicon)

    @app.get(f"{DOCS_ASSETS_ROUTE}/redoc.standalone.js", include_in_schema=False)
    def redoc_script() -> Response:
        return Response(redoc_js, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "public, max-age=86400"})

    app.mount(DOCS_ASSETS_ROUTE, StaticFiles(directory=docs_assets_dir()), name="api-docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=list(dependencies))
    def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url, title=title, swagger_favicon_url=favicon,
            swagger_js_url=f"{DOCS_ASSETS_ROUTE}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_ROUTE}/swagger-ui.css", swagger_ui_parameters={"validatorUrl": None})
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/redoc", include_in_schema=False, dependencies=list(dependencies))
    def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=openapi_url, title=title, redoc_favicon_url=favicon,
                              redoc_js_url=f"{DOCS_ASSETS_ROUTE}/redoc.standalone.js", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page


def mount_frontend(app: FastAPI, directory: Path | None = None) -> None:
    """Serve the frontend at `/` (index.html), its files under /css, /js, and Plotly at /vendor/plotly.min.js."""
    root = Path(directory) if directory is not None else frontend_dir()
    index = root / "index.html"

    @app.api_route(PLOTLY_ROUTE, methods=["GET", "HEAD"], include_in_schema=False)
    def plotly_js() -> FileResponse:
        try:
            path = plotly_js_path()
        except (ImportError, FileNotFoundError) as exc:  # pragma: no cover
            raise HTTPException(404, f"plotly.min.js is not available: {exc}") from None
        return FileResponse(path, media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def frontend_index() -> FileResponse:
        if not index.is_file():
            raise HTTPException(404, f"the frontend is not installed ({index} is missing)")
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=_NO_STALE)

    for sub in ("css", "js"):
        app.mount(f"/{sub}", _Static(directory=root / sub, check_dir=False), name=f"frontend-{sub}")
