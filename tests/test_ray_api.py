"""The server with LNSCOPE_EXECUTOR=ray: a local Ray instance it starts itself, one model worker per
(pair, role), results equal to the local executor's, workers listed by GET /api/v1/workers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("ray")

from lnscope.server.app import create_app  # noqa: E402
from lnscope.server.settings import Settings  # noqa: E402
from tests.test_kind_results import ROWS, assert_same  # noqa: E402

DLA = next(row for row in ROWS if row["kind"] == "dla")


@pytest.fixture(scope="module")
def ray_client(tmp_path_factory):
    app = create_app(Settings(executor="ray", device="cpu", dtype="float32", preload=False,
                              data_dir=tmp_path_factory.mktemp("ray-data")))
    with TestClient(app) as client:
        yield client
    import ray

    assert not ray.is_initialized()  # the server shut down the instance it started


def test_a_trio_dla_through_ray_model_workers(ray_client):
    r = ray_client.post("/api/v1/analyses/dla?wait=true&timeout=300", json={"pair": "tiny", **DLA["request"]})
    assert r.status_code == 200, r.text
    assert_same(r.json()["result"], DLA["result"])
    out = ray_client.get("/api/v1/workers").json()
    assert out["executor"] == "ray"
    workers = {w["role"]: w for w in out["workers"] if w["pair"] == "tiny"}
    assert set(workers) == {"original", "ln_free", "control"}
    assert all(w["state"] == "idle" and w["jobs_done"] >= 1 and w["memory_bytes"] > 0 for w in workers.values())
    assert ray_client.get("/api/v1/health").json()["status"] == "ok"
