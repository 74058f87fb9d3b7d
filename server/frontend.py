"""The web frontend: static ES modules from frontend/ at `/`, Plotly.js from the installed plotly package.

No build step and no CDN: index.html, css/ and js/ are served as they are, and Plotly.js is the
`plotly.min.js` that the plotly Python package ships in its package data (`/vendor/plotly.min.js`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FRONTEND_DIR = Path(__file__).resolve().parents[1] / "frontend"
PLOTLY_ROUTE = "/vendor/plotly.min.js"

# Small, revalidated on every load (ETag / Last-Modified), so an upgrade is picked up at once.
_NO_STALE = {"Cache-Control": "no-cache"}


def plotly_js_path() -> Path:
    """The plotly.min.js bundled with the installed plotly package."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
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


def mount_frontend(app: FastAPI, directory: Path | None = None) -> None:
    """Serve the frontend at `/` (index.html), its files under /css, /js, and Plotly at /vendor/plotly.min.js."""
    root = Path(directory or FRONTEND_DIR)
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
