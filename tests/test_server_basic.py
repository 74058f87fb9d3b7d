"""The server's first endpoints: health and models."""

import re

import pytest
from fastapi.testclient import TestClient

from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.server.app import create_app
from lnscope.server.settings import Settings


@pytest.fixture
def app(trio_dirs, tmp_path, monkeypatch):
    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n'
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
        f'control = {{ path = "{trio_dirs["control"]}" }}\n'
    )
    return create_app(Settings(device="cpu", preload=False), registry=PairRegistry.load(), cache=ModelCache())


def test_health(app):
    with TestClient(app) as client:
        body = client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["device"] == "cpu" and body["version"]


def test_models_lists_pairs_roles_and_load_state(app):
    with TestClient(app) as client:
        before = client.get("/api/v1/models").json()
        assert before["default_pair"] == "local" and before["device"] == "cpu" and before["dtype"] == "float32"
        pairs = {p["name"]: p for p in before["pairs"]}
        assert {"local", "gpt2-small", "tiny"} <= set(pairs)
        small = {r["role"]: r for r in pairs["gpt2-small"]["roles"]}
        assert small["ln_free"]["hub_id"] == "schaeff/gpt2-small_LNFree300" and not small["ln_free"]["loaded"]
        local = {r["role"]: r for r in pairs["local"]["roles"]}
        assert all(r["available_locally"] and r["state"] == "not_loaded" for r in local.values())

        state = app.state.lnscope
        state.load_pair(state.registry.get("local"))
        after = {p["name"]: p for p in client.get("/api/v1/models").json()["pairs"]}
        assert all(r["loaded"] and r["state"] == "loaded" for r in after["local"]["roles"])


def test_a_pair_that_cannot_load_reports_why_and_the_server_keeps_serving(trio_dirs, tmp_path):
    (tmp_path / "lnscope.toml").write_text(
        f'[pairs.broken]\noriginal = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["original"]}" }}\n'
    )
    app = create_app(Settings(device="cpu", pair="broken"), registry=PairRegistry.load(), cache=ModelCache())
    with TestClient(app) as client:  # preload runs in the background
        app.state.lnscope.load_pair(app.state.lnscope.registry.get("broken"))
        pairs = {p["name"]: p for p in client.get("/api/v1/models").json()["pairs"]}
        roles = {r["role"]: r for r in pairs["broken"]["roles"]}
        assert roles["ln_free"]["state"] == "error" and "registered as `ln_free`" in roles["ln_free"]["error"]
        assert client.get("/api/v1/health").status_code == 200


def test_openapi_and_docs_are_served(app):
    with TestClient(app) as client:
        spec = client.get("/api/v1/openapi.json").json()
        assert "/api/v1/models" in spec["paths"] and "/api/v1/health" in spec["paths"]
        assert client.get("/docs").status_code == 200
        for page in ("/docs", "/redoc"):
            r = client.get(page)
            assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
            links = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
            assert links and all(link.startswith("/") for link in links), links
            for link in links:
                assert client.get(link).status_code == 200, link
        redoc_js = client.get("/vendor/api-docs/redoc.standalone.js")
        assert redoc_js.status_code == 200 and "cdn.redoc.ly" not in redoc_js.text
