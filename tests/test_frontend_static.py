"""Fast checks of the web frontend without a browser: module imports resolve, only local URLs,
the files and Plotly.js are served (Plotly from the installed plotly package, never a CDN)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lnscope.server.frontend import PLOTLY_ROUTE, frontend_dir, mount_frontend, plotly_js_path

FRONTEND_DIR = frontend_dir()
JS_DIR = FRONTEND_DIR / "js"
JS_FILES = sorted(JS_DIR.rglob("*.js"))
# import x from "./a.js"; import {a} from "../b.js"; export {c} from "./c.js"; import "./d.js"; import("./e.js")
IMPORT_RE = re.compile(r"""(?:^|[;\s])(?:import|export)\s*(?:[\w*{}\s,$]+?\s*from\s*)?["']([^"']+)["']"""
                       r"""|\bimport\(\s*["']([^"']+)["']\s*\)""", re.M)
REMOTE_RE = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[/"')]""", re.I)


def specifiers(path: Path) -> list[str]:
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)  # comments
    return [a or b for a, b in IMPORT_RE.findall(text)]


def test_the_frontend_exists():
    assert (FRONTEND_DIR / "index.html").is_file()
    assert (JS_DIR / "main.js").is_file()
    assert len(JS_FILES) >= 10


@pytest.mark.parametrize("path", JS_FILES, ids=lambda p: str(p.relative_to(JS_DIR)))
def test_every_module_import_resolves_to_a_file(path):
    found = specifiers(path)
    for spec in found:
        assert spec.startswith(("./", "../")), f"{path.name}: non-relative import {spec!r} (no bare modules, no CDN)"
        target = (path.parent / spec).resolve()
        assert target.is_file(), f"{path.name}: {spec!r} does not exist"
        assert FRONTEND_DIR.resolve() in target.parents, f"{path.name}: {spec!r} leaves frontend/"


def test_every_module_is_reachable_from_main():
    seen, todo = set(), [JS_DIR / "main.js"]
    while todo:
        p = todo.pop().resolve()
        if p in seen:
            continue
        seen.add(p)
        todo += [(p.parent / s) for s in specifiers(p)]
    assert {p.resolve() for p in JS_FILES} <= seen, "modules nothing imports"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, name, value))


def test_index_html_references_only_local_urls():
    parser = _Refs()
    parser.feed((FRONTEND_DIR / "index.html").read_text())
    scripts = [v for t, n, v in parser.refs if t == "script"]
    styles = [v for t, n, v in parser.refs if t == "link"]
    assert "/vendor/plotly.min.js" in scripts and "/js/main.js" in scripts and "/css/app.css" in styles
    for tag, name, value in parser.refs:
        assert not value.startswith(("http:", "https:", "//")), f"<{tag} {name}={value!r}> is not local"
        assert value.startswith(("/", "#", "data:")), f"<{tag} {name}={value!r}>: use an absolute local path"


@pytest.mark.parametrize("path",
                         [FRONTEND_DIR / "index.html", *sorted((FRONTEND_DIR / "css").glob("*.css")), *JS_FILES],
                         ids=lambda p: str(p.relative_to(FRONTEND_DIR)))
def test_no_remote_urls_anywhere(path):
    text = path.read_text()
    text = text.replace("http://www.w3.org/2000/svg", "")  # an XML namespace, not a request
    assert not REMOTE_RE.search(text), f"{path.name} names a remote URL: {REMOTE_RE.search(text).group(0)}"
    assert "@import" not in text or path.suffix != ".css"


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    mount_frontend(app)
    return TestClient(app)


def test_plotly_route_serves_the_plotly_package_file(client):
    import plotly

    r = client.get(PLOTLY_ROUTE)
    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    expected = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert plotly_js_path() == expected.resolve()
    assert r.content == expected.read_bytes()


def test_index_and_every_static_file_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert '<script type="module" src="/js/main.js">' in r.text
    for path in [*JS_FILES, *(FRONTEND_DIR / "css").glob("*.css")]:
        url = "/" + str(path.relative_to(FRONTEND_DIR))
        r = client.get(url)
        assert r.status_code == 200, url
        assert r.content == path.read_bytes()
        if path.suffix == ".js":
            assert "javascript" in r.headers["content-type"], url  # module scripts need a JS MIME type
    assert client.get("/js/nope.js").status_code == 404


def test_create_app_mounts_the_frontend_without_shadowing_the_api(tmp_path):
    from lnscope.server.app import create_app
    from lnscope.server.settings import Settings

    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data"))
    with TestClient(app) as c:
        assert c.get("/").status_code == 200
        assert c.get(PLOTLY_ROUTE).status_code == 200
        assert c.get("/api/v1/health").json()["status"] == "ok"
        assert c.get("/docs").status_code == 200


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (optional syntax check)")
def test_modules_parse(tmp_path):
    """Syntax of every module as an ES module (node --check on a .mjs copy)."""
    for path in JS_FILES:
        copy = tmp_path / (path.stem + ".mjs")
        copy.write_text(path.read_text())
        out = subprocess.run(["node", "--check", str(copy)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{path.relative_to(FRONTEND_DIR)}: {out.stderr[-800:]}"
